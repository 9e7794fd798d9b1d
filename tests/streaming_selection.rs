//! Streaming's selection, computed on the device from the candidates, against the plain
//! rule: the first `sink` pages and the last `window` pages of each row (every page while
//! a row has at most `sink + window`), for rows of different lengths in one batch, with
//! sink and window token counts that round up to whole pages.

mod common;

use candle_core::{DType, Device, Tensor};
use common::algo::select_pages;
use spinkv::partition::{SparseAlgorithm, Streaming, StreamingConfig};
use spinkv::CacheConfig;

#[test]
fn streaming_keeps_the_sink_and_the_window_of_each_row() {
    let (hkv, g, d) = (3, 2, 8);
    // (sink tokens, window tokens, page size): the forced page counts round up.
    for (sink, window, page) in [(8usize, 20usize, 8usize), (1, 1, 4), (64, 1024, 16), (0, 5, 2)] {
        let mut cc = CacheConfig::new(1, hkv * g, hkv, d);
        cc.page_size = page;
        let mut st = Streaming::new(StreamingConfig {
            sink_tokens: sink,
            window_tokens: window,
        });
        st.init(&cc).unwrap();
        let (sp, wp) = (sink.div_ceil(page), window.div_ceil(page));
        // Rows shorter than, equal to and longer than the list, one of a single page.
        let tokens = [1usize, (sp + wp) * page, (sp + wp) * page + 1, 7 * page + 3, 300 * page];
        let q = Tensor::zeros((tokens.len(), hkv * g, d), DType::F32, &Device::Cpu).unwrap();
        let seqs: Vec<u64> = (0..tokens.len() as u64).collect();
        let got = select_pages(&mut st, &seqs, &q, &tokens, page, hkv);
        for (b, &t) in tokens.iter().enumerate() {
            let n = t.div_ceil(page);
            let want: Vec<u32> = (0..n).filter(|&j| j < sp || j + wp >= n).map(|j| j as u32).collect();
            for (h, pages) in got[b].iter().enumerate() {
                assert_eq!(
                    pages, &want,
                    "sink {sink}, window {window}, page {page}: row {b} ({t} tokens), head {h}"
                );
            }
        }
    }
}
