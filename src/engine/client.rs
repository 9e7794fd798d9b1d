//! The engine on its own thread: [`EngineClient`] (Clone + Send + Sync) submits from any
//! thread over a `std::sync::mpsc` command channel; the thread runs steps while there is
//! work and blocks on the channel when idle.

use super::engine::Engine;
use super::handle::{channel, RequestHandle};
use super::metrics::EngineMetrics;
use super::request::{Limits, Prepared, Request, RequestId};
use crate::models::tokenizer::TokenizerInfo;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokenizers::Tokenizer;

enum Command {
    Submit {
        id: RequestId,
        req: Prepared,
        reply: super::handle::Reply,
        submitted: Instant,
    },
    Shutdown,
}

struct Shared {
    limits: Limits,
    info: Option<TokenizerInfo>,
    next_id: Arc<AtomicU64>,
    metrics: Mutex<EngineMetrics>,
    /// The first error `Engine::step` returned, if any (the thread then stops).
    fatal: Mutex<Option<String>>,
    thread: Mutex<Option<JoinHandle<Engine>>>,
}

/// A handle on an engine running on its own thread ([`Engine::spawn`]). Cheap to clone;
/// every clone talks to the same engine.
///
/// `submit` validates and encodes the request on the calling thread (a bad request is
/// an error here and never reaches the engine), then queues it. The engine thread
/// drains the queue between steps, so new requests join the running batch at the next
/// step. When every client is dropped, the thread finishes the requests it holds and
/// exits; [`shutdown`](Self::shutdown) instead cancels them and returns the engine.
#[derive(Clone)]
pub struct EngineClient {
    tx: Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineClient").finish_non_exhaustive()
    }
}

pub(crate) fn spawn(mut engine: Engine) -> Result<EngineClient> {
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        limits: engine.limits().clone(),
        info: engine.tokenizer_info().cloned(),
        next_id: engine.id_counter(),
        metrics: Mutex::new(engine.metrics()),
        fatal: Mutex::new(None),
        thread: Mutex::new(None),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("spinkv-engine".into())
        .spawn(move || {
            run(&mut engine, &rx, &s);
            engine
        })
        .map_err(|e| Error::Model(format!("Engine::spawn: cannot start the engine thread: {e}")))?;
    *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
    Ok(EngineClient { tx, shared })
}

/// The engine thread's loop.
fn run(engine: &mut Engine, rx: &Receiver<Command>, shared: &Shared) {
    let publish = |e: &Engine| *shared.metrics.lock().unwrap_or_else(|p| p.into_inner()) = e.metrics();
    let mut open = true;
    loop {
        // Idle: sleep until a command comes (or every client is gone).
        if !engine.has_work() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(cmd) => {
                    if !apply(engine, cmd) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        // Take everything queued since the last step.
        while open {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !apply(engine, cmd) {
                        publish(engine);
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if let Err(e) = engine.step() {
            *shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            let _ = engine.cancel_all();
            publish(engine);
            return;
        }
        publish(engine);
    }
}

/// Applies a command; `false` on shutdown.
fn apply(engine: &mut Engine, cmd: Command) -> bool {
    match cmd {
        Command::Submit {
            id,
            req,
            reply,
            submitted,
        } => {
            // Validated by the client already; a failure here is reported on the handle.
            let _ = engine.enqueue(id, req, reply, submitted);
            true
        }
        Command::Shutdown => {
            let _ = engine.cancel_all();
            false
        }
    }
}

impl EngineClient {
    /// Validates `req`, encodes a text prompt (on this thread) and queues it. Errors as
    /// [`Engine::submit`]; also fails when the engine thread has stopped.
    pub fn submit(&self, req: Request) -> Result<RequestHandle> {
        if let Some(e) = self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::Model(format!(
                "EngineClient::submit: the engine stopped after an error: {e}"
            )));
        }
        let req = self.shared.limits.prepare(req)?;
        let id = RequestId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (handle, reply) = channel(id, req.prompt.len());
        self.tx
            .send(Command::Submit {
                id,
                req,
                reply,
                submitted: Instant::now(),
            })
            .map_err(|_| Error::Model("EngineClient::submit: the engine thread has stopped".into()))?;
        Ok(handle)
    }

    /// The engine's counters as of its last step.
    pub fn metrics(&self) -> EngineMetrics {
        *self.shared.metrics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tokenizer, if the engine has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.shared.limits.tokenizer.as_deref()
    }

    /// Special tokens and chat template, if the engine was built with
    /// [`Engine::from_loaded`].
    pub fn tokenizer_info(&self) -> Option<&TokenizerInfo> {
        self.shared.info.as_ref()
    }

    /// Longest prompt + `max_new_tokens` accepted.
    pub fn max_seq_len(&self) -> usize {
        self.shared.limits.max_seq_len
    }

    /// The error that stopped the engine thread, if one did.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the engine thread: requests still waiting or running end with
    /// [`FinishReason::Cancelled`](super::FinishReason::Cancelled) (their pages freed),
    /// and the engine is returned (to inspect its cache, or to spawn it again). Only the
    /// first call, from any clone, gets the engine; later calls fail.
    pub fn shutdown(&self) -> Result<Engine> {
        let thread = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::Model("EngineClient::shutdown: the engine was already shut down".into()))?;
        let _ = self.tx.send(Command::Shutdown);
        thread
            .join()
            .map_err(|_| Error::Model("EngineClient::shutdown: the engine thread panicked".into()))
    }
}
