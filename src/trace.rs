//! Selection traces as CSV: `step,layer,seq,kv_head,num_pages,pages` with the selected
//! logical pages space-separated — written by `generate --trace` and `passkey --trace-dir`,
//! read by the cache simulator (`spinkv::sim`).

use crate::cache::SelectionRecord;
use crate::{Error, Result};
use std::io::{BufRead, Write};

/// The CSV header line.
pub const HEADER: &str = "step,layer,seq,kv_head,num_pages,pages";

/// Writes `records` as CSV (with the header).
pub fn write_csv(mut w: impl Write, records: &[SelectionRecord]) -> Result<()> {
    let io = |e: std::io::Error| Error::Config(format!("writing a selection trace: {e}"));
    writeln!(w, "{HEADER}").map_err(io)?;
    for r in records {
        let pages: Vec<String> = r.pages.iter().map(|p| p.to_string()).collect();
        writeln!(
            w,
            "{},{},{},{},{},{}",
            r.step,
            r.layer,
            r.seq,
            r.kv_head,
            r.num_pages,
            pages.join(" ")
        )
        .map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Reads a CSV written by [`write_csv`]; errors name the line.
pub fn read_csv(r: impl BufRead) -> Result<Vec<SelectionRecord>> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line.map_err(|e| Error::Config(format!("reading a selection trace: {e}")))?;
        if i == 0 && line.trim() == HEADER || line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| Error::Config(format!("selection trace line {}: {what}: {line:?}", i + 1));
        let f: Vec<&str> = line.splitn(6, ',').collect();
        if f.len() != 6 {
            return Err(bad("expected 6 comma-separated fields"));
        }
        let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad("not a number"));
        let pages = f[5]
            .split_whitespace()
            .map(|p| p.parse::<u32>().map_err(|_| bad("bad page number")))
            .collect::<Result<Vec<u32>>>()?;
        out.push(SelectionRecord {
            step: num(f[0])?,
            layer: num(f[1])? as u32,
            seq: num(f[2])?,
            kv_head: num(f[3])? as u32,
            num_pages: num(f[4])? as u32,
            pages,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let recs = vec![
            SelectionRecord {
                step: 3,
                layer: 1,
                seq: 7,
                kv_head: 2,
                num_pages: 9,
                pages: vec![0, 4, 8],
            },
            SelectionRecord {
                step: 4,
                layer: 0,
                seq: 7,
                kv_head: 0,
                num_pages: 9,
                pages: vec![],
            },
        ];
        let mut buf = Vec::new();
        write_csv(&mut buf, &recs).unwrap();
        assert_eq!(read_csv(&buf[..]).unwrap(), recs);
        let e = read_csv(&b"step,layer,seq,kv_head,num_pages,pages\n1,2,x,4,5,6\n"[..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("not a number"), "{e}");
    }
}
