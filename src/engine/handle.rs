//! The client's side of one request: a [`RequestHandle`] that streams [`Event`]s (each
//! new token with its text piece, then one [`Completion`]) over a `std::sync::mpsc`
//! channel, and cancels the request. The engine's side of the channel is private.

use super::metrics::Timings;
use super::request::RequestId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// Why a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token id or a stop string was generated.
    Stop,
    /// `max_new_tokens` tokens were generated.
    Length,
    /// Cancelled through [`RequestHandle::cancel`] (or the handle was dropped), or the
    /// engine shut down first.
    Cancelled,
    /// The request failed (the message says why); the engine kept serving the others.
    Error(String),
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinishReason::Stop => write!(f, "stop"),
            FinishReason::Length => write!(f, "length"),
            FinishReason::Cancelled => write!(f, "cancelled"),
            FinishReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// The generated tokens (stop tokens excluded; the tokens that produced a stop string
    /// included).
    pub tokens: Vec<u32>,
    /// The generated text (empty without a tokenizer), cut before a stop string.
    pub text: String,
    /// The end of `text` that no [`TokenEvent`] carried (text held back because it might
    /// have started a stop string, or an incomplete character, when the request ended):
    /// the token events' pieces followed by `final_piece` are exactly `text`.
    pub final_piece: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Queued time, per-token times (TTFT, TPOT and ITL follow from them).
    pub timings: Timings,
}

/// One new token of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// The token id.
    pub token: u32,
    /// Position of the token in the output (0 for the first).
    pub index: usize,
    /// Text this token completes, ready to print: may be empty (a multi-byte character
    /// not yet complete, text held back because it may start a stop string, or no
    /// tokenizer). The pieces of all events, then [`Completion::final_piece`], concatenate
    /// to [`Completion::text`].
    pub text: String,
}

/// What a [`RequestHandle`] receives, in order: zero or more `Token`s, then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token.
    Token(TokenEvent),
    /// The request ended; nothing follows.
    Done(Completion),
}

/// Cancels a request from anywhere (Clone + Send + Sync); see
/// [`RequestHandle::canceller`].
#[derive(Debug, Clone)]
pub struct Canceller(Arc<AtomicBool>);

impl Canceller {
    /// Asks the engine to cancel the request: it leaves the cache (its pages freed in
    /// both tiers) at the start of the engine's next step and ends with
    /// [`FinishReason::Cancelled`]. No effect once the request has finished.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The client's side of a submitted request: streams [`Event`]s, and cancels.
///
/// With a spawned engine ([`Engine::spawn`](super::Engine::spawn)) the events arrive
/// while the engine thread runs, and `recv`/`wait` block until they do. With the
/// synchronous API the events are queued by [`Engine::step`](super::Engine::step): drive
/// the engine first (e.g. [`Engine::run_until_idle`](super::Engine::run_until_idle)),
/// since a blocking `wait` on the engine's own thread would never return.
///
/// Dropping the handle cancels the request (the engine notices it cannot deliver).
/// As an iterator it yields every event, `Done` last, then `None`.
#[derive(Debug)]
pub struct RequestHandle {
    id: RequestId,
    rx: Receiver<Event>,
    cancel: Canceller,
    prompt_tokens: usize,
    done: bool,
}

impl RequestHandle {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Tokens of the (encoded) prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Cancels the request (see [`Canceller::cancel`]); the stream still ends with a
    /// `Done` event.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A cancel switch that can be moved to another thread.
    pub fn canceller(&self) -> Canceller {
        self.cancel.clone()
    }

    /// Blocks for the next event; `None` after `Done` (or if the engine is gone).
    pub fn recv(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(ev) => Some(self.seen(ev)),
            Err(_) => Some(self.lost()),
        }
    }

    /// The next event if one is queued; `None` if none is (or after `Done`).
    pub fn try_recv(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => Some(self.seen(ev)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(self.lost()),
        }
    }

    /// Waits up to `timeout` for the next event; `None` on timeout (or after `Done`).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Some(self.seen(ev)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(self.lost()),
        }
    }

    /// Blocks until the request ends and returns its completion (token events are
    /// consumed). If the engine stops without finishing the request, the completion
    /// has [`FinishReason::Error`].
    pub fn wait(mut self) -> Completion {
        loop {
            match self.recv() {
                Some(Event::Done(c)) => return c,
                Some(Event::Token(_)) => {}
                None => return self.lost_completion(),
            }
        }
    }

    fn seen(&mut self, ev: Event) -> Event {
        if matches!(ev, Event::Done(_)) {
            self.done = true;
        }
        ev
    }

    fn lost(&mut self) -> Event {
        self.done = true;
        Event::Done(self.lost_completion())
    }

    fn lost_completion(&self) -> Completion {
        Completion {
            id: self.id,
            prompt_tokens: self.prompt_tokens,
            tokens: Vec::new(),
            text: String::new(),
            final_piece: String::new(),
            finish_reason: FinishReason::Error("the engine stopped before the request finished".into()),
            timings: Timings::default(),
        }
    }
}

impl Iterator for RequestHandle {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}

/// The engine's side of a request's channel.
#[derive(Debug)]
pub(crate) struct Reply {
    tx: Sender<Event>,
    cancel: Canceller,
}

impl Reply {
    /// Whether the request was cancelled (or its handle dropped).
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Sends an event; `false` when the handle is gone (the request should be dropped).
    pub(crate) fn send(&self, ev: Event) -> bool {
        self.tx.send(ev).is_ok()
    }

    /// Ends a request that was never queued with an error completion.
    pub(crate) fn fail(&self, id: RequestId, prompt_tokens: usize, msg: String) {
        self.send(Event::Done(Completion {
            id,
            prompt_tokens,
            tokens: Vec::new(),
            text: String::new(),
            final_piece: String::new(),
            finish_reason: FinishReason::Error(msg),
            timings: Timings::default(),
        }));
    }
}

/// A connected (handle, reply) pair for a new request.
pub(crate) fn channel(id: RequestId, prompt_tokens: usize) -> (RequestHandle, Reply) {
    let (tx, rx) = std::sync::mpsc::channel();
    let cancel = Canceller(Arc::new(AtomicBool::new(false)));
    (
        RequestHandle {
            id,
            rx,
            cancel: cancel.clone(),
            prompt_tokens,
            done: false,
        },
        Reply { tx, cancel },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_then_done_then_none_and_drop_cancels() {
        let (mut h, r) = channel(RequestId(3), 2);
        assert!(h.try_recv().is_none());
        assert!(r.send(Event::Token(TokenEvent {
            token: 7,
            index: 0,
            text: "a".into()
        })));
        assert!(matches!(h.recv(), Some(Event::Token(t)) if t.token == 7));
        let c = h.canceller();
        assert!(!r.cancelled());
        drop(h);
        assert!(
            c.is_cancelled() && r.cancelled(),
            "dropping an unfinished handle cancels"
        );
        assert!(!r.send(Event::Token(TokenEvent {
            token: 1,
            index: 1,
            text: String::new()
        })));

        let (h, r) = channel(RequestId(4), 1);
        drop(r);
        let done = h.wait();
        assert!(matches!(done.finish_reason, FinishReason::Error(_)));
    }
}
