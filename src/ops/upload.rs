//! [`StagedUpload`]: a fixed number of host words written into a persistent device
//! buffer with one host-to-device copy. On CUDA the words go through a pinned staging
//! buffer of their own (write-combined page-locked memory: one `cuMemcpyHtoDAsync` on the
//! device's stream, no device allocation, no copy kernel); its next write waits for the
//! copy that read it (the staging buffer's event), so the host never overwrites words
//! still in flight. On the CPU the words are copied in place. `cpu_fwd` is the reference;
//! `cuda_fwd` is the copy.

use crate::Result;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

const OP: &str = "StagedUpload::write";

/// Uploads of exactly `len` u32 words (see the module docs).
#[derive(Debug)]
pub struct StagedUpload {
    len: usize,
    #[cfg(feature = "cuda")]
    pinned: Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>,
}

impl StagedUpload {
    /// Uploads of `len` words to buffers on `device` (on CUDA, `len` words of pinned
    /// staging memory are allocated now).
    pub fn new(len: usize, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            use candle_core::cuda_backend::WrapErr;
            let ctx = cuda.cuda_stream().context().clone();
            // SAFETY: the staging memory is written in full before each copy reads it.
            let pinned = unsafe { ctx.alloc_pinned::<u32>(len.max(1)) }.w()?;
            return Ok(Self {
                len,
                pinned: Some(pinned),
            });
        }
        let _ = device;
        Ok(Self {
            len,
            #[cfg(feature = "cuda")]
            pinned: None,
        })
    }

    /// Words per upload.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether uploads carry no words.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `words` (exactly [`len`](Self::len) of them) into the first `len` elements
    /// of `dst` (u32 `[n]`, contiguous, `n >= len`), in place on `dst`'s device: one
    /// host-to-device copy, enqueued on CUDA (no host synchronization, except waiting for
    /// this upload's previous copy to have read its staging words).
    pub fn write(&mut self, dst: &Tensor, words: &[u32]) -> Result<()> {
        let ok = words.len() == self.len
            && dst.dtype() == DType::U32
            && dst.rank() == 1
            && dst.dims()[0] >= self.len
            && dst.is_contiguous();
        if !ok {
            crate::invalid!(
                OP,
                "{} words into {:?} {:?}: expected exactly {} words and a contiguous u32 [n] with n >= {}",
                words.len(),
                dst.dims(),
                dst.dtype(),
                self.len,
                self.len
            );
        }
        if self.len == 0 {
            return Ok(());
        }
        crate::fault::device_call(OP)?;
        #[cfg(feature = "cuda")]
        if let Some(pinned) = self.pinned.as_mut() {
            use candle_core::cuda_backend::WrapErr;
            if !dst.device().is_cuda() {
                crate::invalid!(OP, "this upload stages for a CUDA device; dst is on {:?}", dst.device());
            }
            pinned.as_mut_slice().w()?.copy_from_slice(words);
            dst.inplace_op1(&Copy {
                words,
                pinned: Some(&*pinned),
            })?;
            return Ok(());
        }
        if dst.device().is_cuda() {
            crate::invalid!(OP, "this upload was made for the CPU; dst is on {:?}", dst.device());
        }
        dst.inplace_op1(&Copy {
            words,
            #[cfg(feature = "cuda")]
            pinned: None,
        })?;
        Ok(())
    }
}

struct Copy<'a> {
    words: &'a [u32],
    #[cfg(feature = "cuda")]
    pinned: Option<&'a candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>,
}

impl InplaceOp1 for Copy<'_> {
    fn name(&self) -> &'static str {
        "staged_upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(d), Some((o0, _))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("{OP}: dst must be contiguous u32");
        };
        d[o0..o0 + self.words.len()].copy_from_slice(self.words);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let Some(pinned) = self.pinned else {
            candle_core::bail!("{OP}: no staging buffer for a CUDA destination");
        };
        let Some((o0, _)) = l.contiguous_offsets() else {
            candle_core::bail!("{OP}: dst must be contiguous");
        };
        let stream = s.device.cuda_stream();
        let slice = s.as_cuda_slice_mut::<u32>()?;
        let mut view = slice.slice_mut(o0..o0 + pinned.len());
        stream
            .memcpy_htod(pinned, &mut view)
            .map_err(candle_core::Error::wrap)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_words_in_place_and_names_bad_input() {
        let dev = Device::Cpu;
        let dst = Tensor::full(7u32, 6, &dev).unwrap();
        let mut up = StagedUpload::new(4, &dev).unwrap();
        up.write(&dst, &[1, 2, 3, 4]).unwrap();
        up.write(&dst, &[5, 6, 7, 8]).unwrap();
        assert_eq!(
            dst.to_vec1::<u32>().unwrap(),
            [5, 6, 7, 8, 7, 7],
            "the tail is untouched"
        );
        // A view at an offset is written at its offset.
        let tail = dst.narrow(0, 2, 4).unwrap();
        up.write(&tail, &[9, 9, 9, 9]).unwrap();
        assert_eq!(dst.to_vec1::<u32>().unwrap(), [5, 6, 9, 9, 9, 9]);
        for (words, t) in [
            (vec![1u32; 3], dst.clone()),
            (vec![1u32; 4], Tensor::zeros(3, DType::U32, &dev).unwrap()),
            (vec![1u32; 4], Tensor::zeros(6, DType::F32, &dev).unwrap()),
            (vec![1u32; 4], Tensor::zeros((2, 4), DType::U32, &dev).unwrap()),
        ] {
            let e = up.write(&t, &words).unwrap_err().to_string();
            assert!(e.contains(OP) && e.contains("exactly 4 words"), "{e}");
        }
        assert_eq!(
            dst.to_vec1::<u32>().unwrap(),
            [5, 6, 9, 9, 9, 9],
            "nothing written on errors"
        );
    }
}
