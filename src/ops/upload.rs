//! [`StagedUpload`]: host words written into a persistent device buffer with one
//! host-to-device copy; [`Mailbox`]: host words staged now and copied by device work
//! enqueued later (a CUDA graph can hold that copy: each replay reads the words staged
//! before it, and the host makes no driver call to upload them). On CUDA the words go
//! through pinned staging buffers of the upload's own (write-combined page-locked memory, a
//! ring of [`RING`], each grown when a write needs more): one `cuMemcpyHtoDAsync` on the
//! device's stream, no device allocation, no copy kernel, and never the stream
//! synchronization a copy from pageable memory may cost. Before the host writes a staging
//! buffer again it waits for the copy that read it (an event recorded after each copy), so
//! words still in flight are never overwritten; with the ring, the host may run
//! [`RING`] − 1 uploads ahead of the device before it waits. A [`Mailbox`] has one staging
//! buffer that never moves (a captured copy reads it at its address): staging waits for the
//! copy that last read it, whether an eager one or one inside a replayed graph (the event
//! after the copy is recorded as an external graph node when captured). On the CPU the
//! words are copied in place. `cpu_fwd` is the reference; `cuda_fwd` is the copy.

use crate::Result;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

/// Staging buffers per upload on CUDA.
pub const RING: usize = 3;

/// Uploads of up to a growing number of u32 words (see the module docs). Errors name the
/// op given to [`new`](Self::new) (the owner's), with the shapes.
#[derive(Debug)]
pub struct StagedUpload {
    op: &'static str,
    #[cfg(feature = "cuda")]
    staging: Option<cuda::Staging>,
}

impl StagedUpload {
    /// Uploads for `op` (named by its errors) to buffers on `device`; on CUDA, [`RING`]
    /// staging buffers of `capacity` words of pinned memory are allocated now (more when
    /// a write needs it).
    pub fn new(op: &'static str, capacity: usize, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Self {
                op,
                staging: Some(cuda::Staging::new(dev, capacity)?),
            });
        }
        let _ = (capacity, device);
        Ok(Self {
            op,
            #[cfg(feature = "cuda")]
            staging: None,
        })
    }

    /// Writes `words` into the first `words.len()` elements of `dst` (u32 `[n]`,
    /// contiguous, `n >= words.len()`, on this upload's device), in place: one
    /// host-to-device copy, enqueued on CUDA (the host waits only for the copy of this
    /// upload [`RING`] writes ago to have read its staging words, and on a write larger
    /// than that buffer, for it to be replaced).
    pub fn write(&mut self, dst: &Tensor, words: &[u32]) -> Result<()> {
        let op = self.op;
        check_dst(op, dst, words.len())?;
        if words.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(staging) = self.staging.as_mut() {
            check_device(op, "upload", Some(staging.serves(dst.device())), dst)?;
            crate::fault::device_call(op)?;
            let host = staging.stage(words)?;
            dst.inplace_op1(&Copy {
                op,
                words,
                staging: Some(host),
            })?;
            return Ok(());
        }
        check_device(op, "upload", None, dst)?;
        crate::fault::device_call(op)?;
        dst.inplace_op1(&Copy {
            op,
            words,
            #[cfg(feature = "cuda")]
            staging: None,
        })?;
        Ok(())
    }
}

/// Host words staged by [`stage`](Self::stage) and copied into a device buffer by
/// [`load`](Self::load), which may be enqueued later or captured into a CUDA graph (see
/// the module docs). At most `capacity` words (fixed: the staging buffer never moves).
#[derive(Debug)]
pub struct Mailbox {
    op: &'static str,
    capacity: usize,
    /// Words staged by the last `stage`.
    len: usize,
    /// The staged words on the CPU.
    cpu: Vec<u32>,
    #[cfg(feature = "cuda")]
    staging: Option<cuda::Staging>,
}

impl Mailbox {
    /// A mailbox of `capacity` words for `op` (named by its errors) on `device`; on CUDA
    /// its pinned staging buffer is allocated now.
    pub fn new(op: &'static str, capacity: usize, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Self {
                op,
                capacity,
                len: 0,
                cpu: Vec::new(),
                staging: Some(cuda::Staging::with_slots(dev, capacity, 1)?),
            });
        }
        let _ = device;
        Ok(Self {
            op,
            capacity,
            len: 0,
            cpu: vec![0; capacity],
            #[cfg(feature = "cuda")]
            staging: None,
        })
    }

    /// Stages `words` (at most the capacity) for the next [`load`](Self::load)s; on CUDA
    /// waits first for the copy that last read the staging buffer.
    pub fn stage(&mut self, words: &[u32]) -> Result<()> {
        if words.len() > self.capacity {
            crate::invalid!(
                self.op,
                "{} words staged in a mailbox of {}",
                words.len(),
                self.capacity
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(staging) = self.staging.as_mut() {
            crate::fault::device_call(self.op)?;
            staging.stage(words)?;
            self.len = words.len();
            return Ok(());
        }
        self.cpu[..words.len()].copy_from_slice(words);
        self.len = words.len();
        Ok(())
    }

    /// Copies the staged words into the first of `dst` (u32 `[n]`, contiguous, `n` at
    /// least the staged count, on this mailbox's device), in place: one host-to-device
    /// copy enqueued on CUDA, which a graph captured around it holds.
    pub fn load(&self, dst: &Tensor) -> Result<()> {
        let (op, n) = (self.op, self.len);
        check_dst(op, dst, n)?;
        if n == 0 {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(staging) = self.staging.as_ref() {
            check_device(op, "mailbox", Some(staging.serves(dst.device())), dst)?;
            crate::fault::device_call(op)?;
            let staged = staging.last();
            dst.inplace_op1(&Copy {
                op,
                words: staged.words,
                staging: Some(staged),
            })?;
            return Ok(());
        }
        check_device(op, "mailbox", None, dst)?;
        crate::fault::device_call(op)?;
        dst.inplace_op1(&Copy {
            op,
            words: &self.cpu[..n],
            #[cfg(feature = "cuda")]
            staging: None,
        })?;
        Ok(())
    }
}

/// For `op`: `dst` is a contiguous u32 `[m]` with `m >= n`.
fn check_dst(op: &'static str, dst: &Tensor, n: usize) -> Result<()> {
    let ok = dst.dtype() == DType::U32 && dst.rank() == 1 && dst.dims()[0] >= n && dst.is_contiguous();
    if !ok {
        crate::invalid!(
            op,
            "{n} words into {:?} {:?}: expected a contiguous u32 [n] with n >= {n}",
            dst.dims(),
            dst.dtype()
        );
    }
    Ok(())
}

/// For `op`: `dst` is on the device this `what` (an upload, a mailbox) stages for:
/// `serves` is whether its CUDA staging serves `dst`'s device, `None` when it was made
/// for the CPU.
fn check_device(op: &'static str, what: &str, serves: Option<bool>, dst: &Tensor) -> Result<()> {
    match serves {
        Some(false) => crate::invalid!(
            op,
            "this {what} stages for another device than dst's ({:?})",
            dst.device().location()
        ),
        None if dst.device().is_cuda() => {
            crate::invalid!(op, "this {what} was made for the CPU; dst is on {:?}", dst.device())
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::RING;
    use crate::Result;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::Device;
    use std::sync::Arc;

    /// One staging buffer and the event recorded after the copy that last read it.
    #[derive(Debug)]
    struct Slot {
        pinned: PinnedHostSlice<u32>,
        event: CudaEvent,
    }

    /// The ring of staging buffers of one upload, on one device's stream.
    #[derive(Debug)]
    pub(super) struct Staging {
        slots: Vec<Slot>,
        next: usize,
        /// Address and length of the words [`stage`](Self::stage) wrote last (for
        /// [`last`](Self::last), which must make no driver call: it may run inside a
        /// stream capture, where an event wait is not allowed).
        staged: (usize, usize),
        device: CudaDevice,
        stream: Arc<CudaStream>,
    }

    /// The staged words of one write, for the copy: valid until the copy is enqueued (the
    /// copy records the event that the slot's next use waits for).
    pub(super) struct Staged<'a> {
        pub(super) words: &'a [u32],
        pub(super) event: &'a CudaEvent,
        pub(super) stream: &'a Arc<CudaStream>,
    }

    impl Staging {
        pub(super) fn new(dev: &CudaDevice, capacity: usize) -> Result<Self> {
            Self::with_slots(dev, capacity, RING)
        }

        /// `n` staging buffers of `capacity` words.
        pub(super) fn with_slots(dev: &CudaDevice, capacity: usize, n: usize) -> Result<Self> {
            let stream = dev.cuda_stream();
            let ctx = stream.context().clone();
            let slots = (0..n.max(1))
                .map(|_| {
                    Ok(Slot {
                        // SAFETY: staging words are written before any copy reads them.
                        pinned: unsafe { ctx.alloc_pinned::<u32>(capacity.max(1)) }.w()?,
                        event: ctx.new_event(None).w()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                slots,
                next: 0,
                staged: (0, 0),
                device: dev.clone(),
                stream,
            })
        }

        /// Whether `device` is the one these buffers stage for (the same stream).
        pub(super) fn serves(&self, device: &Device) -> bool {
            use candle_core::backend::BackendDevice;
            matches!(device, Device::Cuda(d) if d.same_device(&self.device))
        }

        /// Takes the next slot: waits for its previous copy, grows it if `words` do not
        /// fit, and copies them in.
        pub(super) fn stage(&mut self, words: &[u32]) -> Result<Staged<'_>> {
            let i = self.next;
            self.next = (i + 1) % self.slots.len();
            let slot = &mut self.slots[i];
            slot.event.synchronize().w()?;
            if words.len() > slot.pinned.len() {
                let ctx = self.stream.context().clone();
                // SAFETY: as in `new`; the old buffer's last copy is done (waited above).
                slot.pinned = unsafe { ctx.alloc_pinned::<u32>(words.len().max(2 * slot.pinned.len())) }.w()?;
            }
            // No copy through cudarc reads `pinned`, so its own event is never recorded
            // and this does not wait.
            let staged = &mut slot.pinned.as_mut_slice().w()?[..words.len()];
            staged.copy_from_slice(words);
            self.staged = (staged.as_ptr() as usize, staged.len());
            Ok(self.last())
        }

        /// The words [`stage`](Self::stage) wrote last, for a copy enqueued later. No
        /// driver call (capturable).
        pub(super) fn last(&self) -> Staged<'_> {
            let n = self.slots.len();
            let slot = &self.slots[(self.next + n - 1) % n];
            let (addr, len) = self.staged;
            let words: &[u32] = if len == 0 {
                &[]
            } else {
                // SAFETY: `addr` points at `len` initialized words of `slot`'s pinned
                // buffer (written by the last `stage`), which lives as long as `self` and
                // is only replaced by `stage`, which needs `&mut self`.
                unsafe { std::slice::from_raw_parts(addr as *const u32, len) }
            };
            Staged {
                words,
                event: &slot.event,
                stream: &self.stream,
            }
        }
    }

    impl Drop for Staging {
        fn drop(&mut self) {
            // The pinned words must outlive the copies that read them.
            let ctx = self.stream.context().clone();
            for slot in &self.slots {
                ctx.record_err(slot.event.synchronize());
            }
        }
    }
}

struct Copy<'a> {
    op: &'static str,
    words: &'a [u32],
    #[cfg(feature = "cuda")]
    staging: Option<cuda::Staged<'a>>,
}

impl InplaceOp1 for Copy<'_> {
    fn name(&self) -> &'static str {
        "staged_upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(d), Some((o0, _))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("{}: dst must be contiguous u32", self.op);
        };
        d[o0..o0 + self.words.len()].copy_from_slice(self.words);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
        use candle_core::cuda_backend::WrapErr;
        let Some(st) = self.staging.as_ref() else {
            candle_core::bail!("{}: no staging buffer for a CUDA destination", self.op);
        };
        let Some((o0, _)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: dst must be contiguous", self.op);
        };
        let slice = s.as_cuda_slice_mut::<u32>()?;
        let (base, _sync) = slice.device_ptr_mut(st.stream);
        let at = base + (o0 * std::mem::size_of::<u32>()) as u64;
        // SAFETY: `at` is element `o0` of a u32 device buffer with at least
        // `st.words.len()` elements from there (checked by `write`), and `st.words` lives
        // in pinned memory that is not written again before `st.event`, recorded right
        // after the copy on the same stream, has completed.
        unsafe { result::memcpy_htod_async(at, st.words, st.stream.cu_stream()) }.w()?;
        let (capturing, recorded) = record_after(st.event, st.stream);
        if let Err(e) = recorded {
            // Without the event the next use of these staging words would not wait for
            // this copy: wait for it here instead (not while capturing: nothing runs
            // before a launch, and a synchronization would break the capture). The
            // record's error is the one reported.
            if !capturing {
                let _ = st.stream.synchronize();
            }
            return Err(e).w();
        }
        Ok(())
    }
}

/// Records `event` on `stream`; while `stream` is being captured, as an external event
/// node, so that each replay of the graph records it (a plain record inside a capture
/// only orders the captured work). Returns whether the stream was capturing (`false`
/// when that could not be asked) with the record's result.
#[cfg(feature = "cuda")]
fn record_after(
    event: &candle_core::cuda_backend::cudarc::driver::CudaEvent,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
) -> (
    bool,
    std::result::Result<(), candle_core::cuda_backend::cudarc::driver::DriverError>,
) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let capturing = match stream.capture_status() {
        Ok(status) => status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE,
        Err(e) => return (false, Err(e)),
    };
    if !capturing {
        return (false, event.record(stream));
    }
    let flags = sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as std::ffi::c_uint;
    // SAFETY: the event and the stream are live and belong to one context (the stream's,
    // whose event this is: both come from `Staging`).
    (
        true,
        unsafe { sys::cuEventRecordWithFlags(event.cu_event(), stream.cu_stream(), flags) }.result(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_words_in_place_and_names_bad_input() {
        let dev = Device::Cpu;
        let dst = Tensor::full(7u32, 6, &dev).unwrap();
        let mut up = StagedUpload::new("test upload", 4, &dev).unwrap();
        up.write(&dst, &[1, 2, 3, 4, 1]).unwrap();
        up.write(&dst, &[5, 6, 7, 8]).unwrap();
        assert_eq!(
            dst.to_vec1::<u32>().unwrap(),
            [5, 6, 7, 8, 1, 7],
            "past the words untouched"
        );
        // A view at an offset is written at its offset.
        let tail = dst.narrow(0, 2, 4).unwrap();
        up.write(&tail, &[9, 9, 9, 9]).unwrap();
        assert_eq!(dst.to_vec1::<u32>().unwrap(), [5, 6, 9, 9, 9, 9]);
        up.write(&tail, &[]).unwrap();
        for (words, t) in [
            (vec![1u32; 7], dst.clone()),
            (vec![1u32; 4], Tensor::zeros(3, DType::U32, &dev).unwrap()),
            (vec![1u32; 4], Tensor::zeros(6, DType::F32, &dev).unwrap()),
            (vec![1u32; 4], Tensor::zeros((2, 4), DType::U32, &dev).unwrap()),
        ] {
            let e = up.write(&t, &words).unwrap_err().to_string();
            assert!(
                e.contains("test upload") && e.contains(&format!("n >= {}", words.len())),
                "{e}"
            );
        }
        assert_eq!(
            dst.to_vec1::<u32>().unwrap(),
            [5, 6, 9, 9, 9, 9],
            "nothing written on errors"
        );
    }

    #[test]
    fn a_mailbox_loads_what_was_staged_last_and_names_bad_input() {
        let dev = Device::Cpu;
        let dst = Tensor::full(7u32, 6, &dev).unwrap();
        let mut mb = Mailbox::new("test mailbox", 4, &dev).unwrap();
        mb.load(&dst).unwrap();
        assert_eq!(dst.to_vec1::<u32>().unwrap(), [7; 6], "nothing staged: nothing loaded");
        mb.stage(&[1, 2, 3]).unwrap();
        mb.stage(&[4, 5]).unwrap();
        let tail = dst.narrow(0, 1, 5).unwrap();
        mb.load(&tail).unwrap();
        assert_eq!(dst.to_vec1::<u32>().unwrap(), [7, 4, 5, 7, 7, 7]);
        let e = mb.stage(&[1; 5]).unwrap_err().to_string();
        assert!(
            e.contains("test mailbox") && e.contains("5 words staged in a mailbox of 4"),
            "{e}"
        );
        for t in [
            Tensor::zeros(1, DType::U32, &dev).unwrap(),
            Tensor::zeros(6, DType::F32, &dev).unwrap(),
            Tensor::zeros((2, 4), DType::U32, &dev).unwrap(),
        ] {
            let e = mb.load(&t).unwrap_err().to_string();
            assert!(e.contains("test mailbox") && e.contains("n >= 2"), "{e}");
        }
        assert_eq!(
            dst.to_vec1::<u32>().unwrap(),
            [7, 4, 5, 7, 7, 7],
            "nothing written on errors"
        );
    }
}
