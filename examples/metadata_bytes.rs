//! Page-table bytes of the two-level tables for a workload (on the host, and as
//! uploaded to a device: directory matrix + leaf arena), next to a flat table of
//! `max_batch × max_context/page × layers × heads` entries.
//!
//! `cargo run --release --example metadata_bytes -- --requests 64 --max-context 131072`

use clap::Parser;
use spinkv::meta::{flat_table_bytes, DeviceTables, PageTables};

#[derive(Parser, Debug)]
#[command(about = "Two-level page-table bytes vs a flat table")]
struct Args {
    /// Concurrent requests (= max batch of the flat table).
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Longest context the flat table must cover.
    #[arg(long, default_value_t = 131072)]
    max_context: usize,
    /// Layers and KV heads (default: Llama-3.1-8B).
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
}

fn main() -> spinkv::Result<()> {
    let a = Args::parse();
    let flat = flat_table_bytes(a.requests, a.max_context, a.page_size, a.layers, a.kv_heads);
    println!(
        "{} requests, {} layers × {} KV heads, page {} — flat table for {} tokens each: {:.1} MiB",
        a.requests,
        a.layers,
        a.kv_heads,
        a.page_size,
        a.max_context,
        flat as f64 / (1 << 20) as f64
    );
    println!(
        "{:>28} {:>14} {:>14} {:>14} {:>8}",
        "workload (tokens/request)", "two-level", "on device", "flat", "ratio"
    );
    let dirs = a.layers * a.kv_heads;
    for (label, lens) in [
        ("all at max context", vec![a.max_context; a.requests]),
        ("all at 1/8 of max", vec![a.max_context / 8; a.requests]),
        (
            "mixed 1K..max (geometric)",
            (0..a.requests)
                .map(|i| (1024usize << (i % 8)).min(a.max_context))
                .collect(),
        ),
        (
            "one long, rest 2K",
            (0..a.requests)
                .map(|i| if i == 0 { a.max_context } else { 2048 })
                .collect(),
        ),
    ] {
        let mut t = PageTables::new(a.layers, a.kv_heads);
        let mut next = 0u32;
        for (s, len) in lens.iter().enumerate() {
            t.add_sequence(s as u64);
            for _ in 0..len.div_ceil(a.page_size) {
                let slots: Vec<u32> = (next..next + dirs as u32).collect();
                next += dirs as u32;
                t.push_page(s as u64, &slots)?;
            }
        }
        let two = t.bytes();
        let dev = DeviceTables::bytes_for(&t);
        println!(
            "{:>28} {:>11.1} MiB {:>11.1} MiB {:>11.1} MiB {:>7.2}×",
            label,
            two as f64 / (1 << 20) as f64,
            dev as f64 / (1 << 20) as f64,
            flat as f64 / (1 << 20) as f64,
            dev as f64 / flat as f64
        );
    }
    Ok(())
}
