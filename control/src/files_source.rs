//! The `files` source's loop: watch the manifest path, re-read what changed, publish.
//!
//! The directory (or, for a single manifest file, the directory holding it) is watched
//! with inotify (the `notify` crate): an event re-reads at once the files it names and
//! checks the others' metadata, so a change is served within milliseconds and an idle
//! source costs nothing. A file created or modified but not yet closed is waited for (up
//! to [`WRITE_GRACE`]), so that a slow writer's half-written file is not served. Every `poll` (the config's `services.poll_ms`) the files'
//! metadata (not their content) is checked as well, for filesystems where inotify misses
//! changes (NFS, some FUSE and overlay mounts, a symlinked directory repointed) and to
//! re-arm the watch when the directory comes back after being removed.
//!
//! What is published: every document that parses (see [`crate::manifests`]), with the
//! others listed as the model's problems. An empty directory publishes an empty model (no
//! Services). Only a path that cannot be listed (removed, unmounted, no permission) keeps
//! the last model: it is published again with the reason among its problems, so
//! `/v1/services` and the metrics show it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::manifests::{Loaded, ManifestSet};
use crate::model::{Model, SourceProblem};

/// After an event, how long without another one before the files are read: a burst (an
/// editor's write, rename and chmod; a ConfigMap's symlink swap) is read once.
const QUIET: Duration = Duration::from_millis(5);
/// How long a file still open for writing (modified, not yet closed) is waited for, so
/// that a half-written file is not served (its cut-off document would be skipped and its
/// objects would flap).
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// What an inotify event tells the loop.
enum Change {
    /// These names in the watched directory were written, created, removed or renamed;
    /// `writing`: a writer still has them open (created or modified, not yet closed).
    Named { names: Vec<OsString>, writing: bool },
    /// Something happened (or the watch overflowed): check every file's metadata.
    Unknown,
}

/// The `files` source: loads `path`, publishes `Some(model)`, then republishes whenever
/// what the files hold changes (see the module doc). Returns when every receiver of
/// `updates` is gone.
pub async fn watch_files(
    path: PathBuf,
    poll: Duration,
    updates: watch::Sender<Option<Arc<Model>>>,
) {
    // A zero interval would spin.
    let poll = poll.max(Duration::from_millis(10));
    let (events_tx, mut events) = mpsc::unbounded_channel::<Change>();
    let mut set = Some(ManifestSet::new(path.clone()));
    let mut watcher: Option<RecommendedWatcher> = None;
    let mut watch_failure_logged = false;
    let mut published = false;
    let mut last_model: Option<Arc<Model>> = None;
    // Whether the last refresh could not list the path (the last model is kept).
    let mut path_failed = false;
    let mut touched: HashSet<OsString> = HashSet::new();
    loop {
        if watcher.is_none() {
            match watch_path(&path, events_tx.clone()) {
                Ok(armed) => {
                    watcher = Some(armed);
                    watch_failure_logged = false;
                }
                Err(error) if !watch_failure_logged => {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "cannot watch the manifest path; checking it every {} ms",
                        poll.as_millis()
                    );
                    watch_failure_logged = true;
                }
                Err(_) => {}
            }
        }
        let mut current = set.take().expect("handed back by every refresh");
        let names = std::mem::take(&mut touched);
        let refreshed = tokio::task::spawn_blocking(move || {
            let result = current.refresh(&names);
            let loaded = match result {
                Ok(changed) => Ok(changed.then(|| current.assemble())),
                Err(error) => Err(error),
            };
            (current, loaded)
        })
        .await;
        let (returned, result) = match refreshed {
            Ok(refreshed) => refreshed,
            Err(error) => {
                // Parsing never panics; should it, the source stops loudly.
                tracing::error!(%error, "the manifest reader failed; the files source stops");
                return;
            }
        };
        match result {
            Ok(loaded) => {
                let loaded = match loaded {
                    Some(loaded) => Some(loaded),
                    // Nothing changed, but the first model (an empty directory) or the one
                    // after a path failure (without its problem) is still due.
                    None if !published || path_failed => Some(returned.assemble()),
                    None => None,
                };
                if let Some(loaded) = loaded {
                    let model = Arc::new(log_loaded(returned.path(), loaded));
                    if updates.send(Some(model.clone())).is_err() {
                        return;
                    }
                    published = true;
                    last_model = Some(model);
                }
                path_failed = false;
            }
            Err(error) => {
                if !path_failed {
                    tracing::warn!(%error, "manifest path unreadable; keeping the last snapshot");
                    // The watch went with the directory; it is armed again once it is back.
                    watcher = None;
                    if let Some(last) = &last_model {
                        let mut model = Model::clone(last);
                        model.problems.push(SourceProblem {
                            file: path.display().to_string(),
                            reason: "path_unreadable",
                            message: format!("{error}; the last snapshot is kept"),
                        });
                        if updates.send(Some(Arc::new(model))).is_err() {
                            return;
                        }
                    }
                }
                path_failed = true;
            }
        }
        set = Some(returned);

        tokio::select! {
            _ = updates.closed() => return,
            _ = tokio::time::sleep(poll) => {}
            Some(change) = events.recv() => {
                let mut writing = HashSet::new();
                note(change, &mut touched, &mut writing);
                let started = tokio::time::Instant::now();
                loop {
                    let wait = if writing.is_empty() {
                        QUIET
                    } else {
                        WRITE_GRACE.saturating_sub(started.elapsed()).min(QUIET * 20)
                    };
                    match tokio::time::timeout(wait, events.recv()).await {
                        Ok(Some(change)) => note(change, &mut touched, &mut writing),
                        _ if writing.is_empty() || started.elapsed() >= WRITE_GRACE => break,
                        _ => {}
                    }
                }
            }
        }
    }
}

fn note(change: Change, touched: &mut HashSet<OsString>, writing: &mut HashSet<OsString>) {
    if let Change::Named {
        names,
        writing: open,
    } = change
    {
        for name in names {
            if open {
                writing.insert(name.clone());
            } else {
                writing.remove(&name);
            }
            touched.insert(name);
        }
    }
}

fn log_loaded(path: &Path, loaded: Loaded) -> Model {
    for note in &loaded.skipped {
        tracing::debug!("{note}");
    }
    for problem in loaded.problems() {
        tracing::warn!("{problem}");
    }
    tracing::info!(
        path = %path.display(),
        files = loaded.files.len(),
        services = loaded.model.services.len(),
        endpoint_slices = loaded.model.endpoint_slices.len(),
        problems = loaded.model.problems.len(),
        "manifests loaded"
    );
    loaded.model
}

/// Watches the directory of `path` (itself, or the directory holding a manifest file:
/// editors and ConfigMap mounts replace files by renaming, which a watch on the file
/// itself would lose).
fn watch_path(
    path: &Path,
    events: mpsc::UnboundedSender<Change>,
) -> notify::Result<RecommendedWatcher> {
    let directory = if std::fs::metadata(path)?.is_dir() {
        path.to_owned()
    } else {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        }
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let change = match event {
            Ok(event) => match event.kind {
                // Opening and reading (ours included) change nothing; a write that
                // finished does.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => named(&event, false),
                EventKind::Access(_) => return,
                _ if event.need_rescan() => Change::Unknown,
                EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                    named(&event, true)
                }
                _ => named(&event, false),
            },
            Err(_) => Change::Unknown,
        };
        // The loop is gone when the source stopped; nothing to tell then.
        let _ = events.send(change);
    })?;
    watcher.watch(&directory, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn named(event: &notify::Event, writing: bool) -> Change {
    Change::Named {
        names: event
            .paths
            .iter()
            .filter_map(|path| path.file_name().map(OsString::from))
            .collect(),
        writing,
    }
}
