//! The engine loop: one thread owns the model, KV cache and scheduler and steps them while
//! there is work; async callers hold an [`EngineHandle`] and get a [`RequestStream`] of
//! typed token events per request.
//!
//! Long-lived mutable state has this one owner; callers only send commands. Dropping a
//! stream aborts its request, so a client that goes away frees its blocks at the next step.

mod core;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub use self::core::{
    EndInfo, EngineConfig, EngineCore, EngineStats, FinishReason, GenerateRequest, TokenEvent, TokenOut,
};
use crate::EngineError;
use crate::scheduler::RequestId;

enum Command {
    Add(RequestId, GenerateRequest, mpsc::UnboundedSender<TokenEvent>),
    Abort(RequestId),
    Stats(oneshot::Sender<EngineStats>),
}

/// A cloneable handle to a running engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    next_id: Arc<AtomicU64>,
    thread: Arc<ThreadGuard>,
}

#[derive(Debug)]
struct ThreadGuard(Option<JoinHandle<()>>);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Add(id, ..) => write!(f, "Add({})", id.0),
            Command::Abort(id) => write!(f, "Abort({})", id.0),
            Command::Stats(_) => write!(f, "Stats"),
        }
    }
}

impl EngineHandle {
    /// Starts the engine loop on a worker of its own compute pool (`EngineConfig::threads`
    /// workers): the loop thread takes part in every parallel op instead of handing it
    /// to sleeping workers and waiting. It stops when every handle and stream is dropped.
    pub fn spawn(core: EngineCore) -> Result<Self, EngineError> {
        let threads = core.config().threads;
        let (tx, rx) = channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tandem-engine-{i}"))
            .build()
            .map_err(|e| EngineError::BadBatch(format!("cannot start the engine's threads: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || pool.install(|| run(core, rx)))
            .map_err(|e| EngineError::BadBatch(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { tx, next_id: Arc::new(AtomicU64::new(1)), thread: Arc::new(ThreadGuard(Some(thread))) })
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (etx, erx) = mpsc::unbounded_channel();
        self.tx.send(Command::Add(id, req, etx)).map_err(|_| EngineError::BadBatch("the engine has stopped".into()))?;
        Ok(RequestStream { id, rx: erx, tx: self.tx.clone(), ended: false })
    }

    /// Gauges and counters, answered between steps.
    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stats(tx)).map_err(|_| EngineError::BadBatch("the engine has stopped".into()))?;
        rx.await.map_err(|_| EngineError::BadBatch("the engine has stopped".into()))
    }

    /// [`EngineHandle::stats`] for callers outside an async runtime.
    pub fn blocking_stats(&self) -> Result<EngineStats, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stats(tx)).map_err(|_| EngineError::BadBatch("the engine has stopped".into()))?;
        rx.blocking_recv().map_err(|_| EngineError::BadBatch("the engine has stopped".into()))
    }

    /// Whether the engine thread is still alive.
    pub fn is_running(&self) -> bool {
        self.thread.0.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// The events of one request. Dropping it before `End` aborts the request.
#[derive(Debug)]
pub struct RequestStream {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<TokenEvent>,
    tx: Sender<Command>,
    ended: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    pub async fn next(&mut self) -> Option<TokenEvent> {
        let ev = self.rx.recv().await;
        self.note(&ev);
        ev
    }

    /// [`RequestStream::next`] for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<TokenEvent> {
        let ev = self.rx.blocking_recv();
        self.note(&ev);
        ev
    }

    /// Aborts the request now; an `End` with `Aborted` follows.
    pub fn abort(&self) {
        let _ = self.tx.send(Command::Abort(self.id));
    }

    fn note(&mut self, ev: &Option<TokenEvent>) {
        if matches!(ev, Some(TokenEvent::End(_)) | None) {
            self.ended = true;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

fn run(mut core: EngineCore, rx: Receiver<Command>) {
    let handle = |core: &mut EngineCore, cmd: Command| match cmd {
        Command::Add(id, req, sink) => core.add(id, req, sink),
        Command::Abort(id) => {
            core.abort(id);
        }
        Command::Stats(reply) => {
            let _ = reply.send(core.stats());
        }
    };
    loop {
        // Take every command that arrived during the last step, then step.
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle(&mut core, cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if core.has_work() {
            core.step();
        } else {
            match rx.recv() {
                Ok(cmd) => handle(&mut core, cmd),
                Err(_) => return,
            }
        }
    }
}
