//! The `files` service source: Kubernetes YAML (or JSON) manifests on disk.
//!
//! A path is one file or a directory whose `*.yaml`, `*.yml` and `*.json` files are read in
//! name order (not recursively). A file holds several documents (`---`), each an object or
//! a `kind: List` (what `kubectl get svc,endpointslices -A -o yaml` prints). Only
//! `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` are loaded; every other object is
//! skipped and listed in [`Loaded::skipped`]. A missing namespace means `default`. The same
//! object defined twice is an error (naming both places).
//!
//! Errors name the file, the document (and List item), the object and the field path:
//! `configs/lab/services.yaml: document 2 (Service default/web): spec.ports[0].port:
//! invalid type: string "http", expected i32`.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::model::{Model, ObjectKey, ObjectKind};

/// Why a manifest path could not be loaded. `Display` is the one-line message for users.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The reason is part of the message and not an error `source`, so that chains
    /// (`{:#}`) print it once.
    #[error("{}: {}", path.display(), crate::config::io_reason(error))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A document is not valid YAML/JSON, or an object does not match its schema.
    #[error("{}: {location}: {message}", path.display())]
    Parse {
        path: PathBuf,
        /// `document N`, `document N item M`, with `(Kind namespace/name)` when known.
        location: String,
        /// The field path and the cause, e.g. `spec.ports[0].port: invalid type: ...`.
        message: String,
    },
    #[error("{}: {location}: {object} is already defined in {first}", path.display())]
    Duplicate {
        path: PathBuf,
        location: String,
        /// `Kind namespace/name`.
        object: String,
        /// Where it was first defined (`file: document N (...)`).
        first: String,
    },
    #[error("{}: no *.yaml, *.yml or *.json files", path.display())]
    Empty { path: PathBuf },
}

/// A loaded model and what was skipped on the way.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub model: Model,
    /// One line per skipped object, e.g. `lab.yaml: document 3: skipped apps/v1 Deployment lab/web`.
    pub skipped: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// Loads the Services and EndpointSlices of `path` (a file or a directory).
pub fn load_path(path: &Path) -> Result<Model, ManifestError> {
    load(path).map(|loaded| loaded.model)
}

/// Like [`load_path`], also returning the skipped objects and the files read.
pub fn load(path: &Path) -> Result<Loaded, ManifestError> {
    let files = manifest_files(path)?;
    let mut loader = Loader::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|error| ManifestError::Io {
            path: file.clone(),
            error,
        })?;
        loader.load_text(file, &text)?;
    }
    Ok(Loaded {
        model: loader.model,
        skipped: loader.skipped,
        files,
    })
}

/// Loads manifests from a string, as if read from `path` (for tests and `check`).
pub fn load_str(path: &Path, text: &str) -> Result<Loaded, ManifestError> {
    let mut loader = Loader::default();
    loader.load_text(path, text)?;
    Ok(Loaded {
        model: loader.model,
        skipped: loader.skipped,
        files: vec![path.to_owned()],
    })
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files of `path`: itself, or a directory's manifest files sorted by name.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |error| ManifestError::Io {
        path: path.to_owned(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?;
        let file = entry.path();
        let name = entry.file_name();
        // Editors' swap and backup files start with a dot.
        if name.to_string_lossy().starts_with('.') || !is_manifest(&file) {
            continue;
        }
        if std::fs::metadata(&file).map_err(io)?.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ManifestError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(files)
}

#[derive(Default)]
struct Loader {
    /// Its `origins` say where each object was first defined, for duplicate errors and
    /// for the compiler's warnings.
    model: Model,
    skipped: Vec<String>,
}

/// apiVersion, kind, namespace/name of a document, as far as they can be read.
struct Header {
    api_version: String,
    kind: String,
    namespace: String,
    name: Option<String>,
}

impl Header {
    fn of(value: &Value) -> Header {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let metadata = value.get("metadata");
        Header {
            api_version: text(value.get("apiVersion")).unwrap_or_default(),
            kind: text(value.get("kind")).unwrap_or_default(),
            namespace: text(metadata.and_then(|m| m.get("namespace")))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            name: text(metadata.and_then(|m| m.get("name"))),
        }
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            &self.kind
        };
        match &self.name {
            Some(name) => write!(f, "{kind} {}/{name}", self.namespace),
            None => write!(f, "{kind} without metadata.name"),
        }
    }
}

impl Loader {
    fn load_text(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
        if is_json {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| ManifestError::Parse {
                    path: path.to_owned(),
                    location: "document 1".to_owned(),
                    message: e.to_string(),
                })?;
            let value = serde_yaml::to_value(value).map_err(|e| ManifestError::Parse {
                path: path.to_owned(),
                location: "document 1".to_owned(),
                message: e.to_string(),
            })?;
            return self.load_document(path, "document 1".to_owned(), value, true);
        }
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let location = format!("document {}", index + 1);
            let value = <Value as serde::Deserialize>::deserialize(document).map_err(|e| {
                ManifestError::Parse {
                    path: path.to_owned(),
                    location: location.clone(),
                    message: e.to_string(),
                }
            })?;
            self.load_document(path, location, value, true)?;
        }
        Ok(())
    }

    fn load_document(
        &mut self,
        path: &Path,
        location: String,
        value: Value,
        allow_list: bool,
    ) -> Result<(), ManifestError> {
        if value.is_null() {
            return Ok(()); // an empty document (e.g. a trailing `---`)
        }
        let parse_error = |location: String, message: String| ManifestError::Parse {
            path: path.to_owned(),
            location,
            message,
        };
        if !value.is_mapping() {
            return Err(parse_error(
                location,
                "expected a Kubernetes object (a mapping)".to_owned(),
            ));
        }
        let header = Header::of(&value);
        let described = format!("{location} ({header})");
        match (header.api_version.as_str(), header.kind.as_str()) {
            ("v1", "List") | ("", "List") if allow_list => {
                let items = match value.get("items") {
                    None | Some(Value::Null) => return Ok(()),
                    Some(Value::Sequence(items)) => items.clone(),
                    Some(_) => {
                        return Err(parse_error(
                            location,
                            "items: expected a sequence".to_owned(),
                        ))
                    }
                };
                for (index, item) in items.into_iter().enumerate() {
                    self.load_document(
                        path,
                        format!("{location} item {}", index + 1),
                        item,
                        false,
                    )?;
                }
                Ok(())
            }
            ("v1", "Service") => {
                let mut service: Service =
                    typed(value).map_err(|m| parse_error(described.clone(), m))?;
                let key =
                    self.key_of(path, &described, ObjectKind::Service, &mut service.metadata)?;
                self.model.services.insert(key, Arc::new(service));
                Ok(())
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let mut slice: EndpointSlice =
                    typed(value).map_err(|m| parse_error(described.clone(), m))?;
                let key = self.key_of(
                    path,
                    &described,
                    ObjectKind::EndpointSlice,
                    &mut slice.metadata,
                )?;
                self.model.endpoint_slices.insert(key, Arc::new(slice));
                Ok(())
            }
            ("", _) | (_, "") => Err(parse_error(
                described,
                "apiVersion and kind are required".to_owned(),
            )),
            (api_version, kind) => {
                let name = header.name.as_deref().unwrap_or("?");
                self.skipped.push(format!(
                    "{}: {location}: skipped {api_version} {kind} {}/{name}",
                    path.display(),
                    header.namespace
                ));
                Ok(())
            }
        }
    }

    /// Defaults the namespace, requires a name and rejects duplicates.
    fn key_of(
        &mut self,
        path: &Path,
        described: &str,
        kind: ObjectKind,
        metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Result<ObjectKey, ManifestError> {
        let namespace = metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        metadata.namespace = Some(namespace.clone());
        let Some(name) = metadata.name.clone().filter(|n| !n.is_empty()) else {
            return Err(ManifestError::Parse {
                path: path.to_owned(),
                location: described.to_owned(),
                message: "metadata.name: missing".to_owned(),
            });
        };
        let key = ObjectKey::new(namespace, name);
        let here = format!("{}: {described}", path.display());
        if let Some(first) = self.model.origins.get(&(kind, key.clone())) {
            return Err(ManifestError::Duplicate {
                path: path.to_owned(),
                location: described.to_owned(),
                object: format!("{kind} {key}"),
                first: first.clone(),
            });
        }
        self.model.origins.insert((kind, key.clone()), here);
        Ok(key)
    }
}

/// Deserializes a typed object, the error naming the field path.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// What identifies the content of the manifest path: the file listing and every file's
/// bytes.
fn fingerprint(path: &Path) -> Result<u64, ManifestError> {
    let files = manifest_files(path)?;
    let mut hasher = DefaultHasher::new();
    for file in &files {
        file.hash(&mut hasher);
        let bytes = std::fs::read(file).map_err(|error| ManifestError::Io {
            path: file.clone(),
            error,
        })?;
        bytes.hash(&mut hasher);
    }
    Ok(hasher.finish())
}

/// The `files` source: loads `path`, publishes `Some(model)`, then polls every `poll` and
/// republishes when the directory listing or any file's content changed. A change that
/// does not load (e.g. a half-written file) keeps the last good model and is logged with
/// `tracing::warn!`; a partial model is never published. Returns when every receiver of
/// `updates` is gone.
pub async fn watch_files(
    path: PathBuf,
    poll: Duration,
    updates: tokio::sync::watch::Sender<Option<Arc<Model>>>,
) {
    let mut last: Option<u64> = None;
    let mut first = true;
    loop {
        if updates.is_closed() {
            return;
        }
        let probe = path.clone();
        let current = match tokio::task::spawn_blocking(move || fingerprint(&probe)).await {
            Ok(Ok(fp)) => Some(fp),
            Ok(Err(error)) => {
                if last.is_some() || first {
                    tracing::warn!(%error, "manifests unreadable; keeping the last good model");
                }
                first = false;
                last = None;
                None
            }
            Err(error) => {
                tracing::warn!(%error, "manifest poll task failed");
                None
            }
        };
        if let Some(fp) = current {
            if last != Some(fp) {
                last = Some(fp);
                first = false;
                let load_path_buf = path.clone();
                match tokio::task::spawn_blocking(move || load(&load_path_buf)).await {
                    Ok(Ok(loaded)) => {
                        for note in &loaded.skipped {
                            tracing::debug!("{note}");
                        }
                        tracing::info!(
                            path = %path.display(),
                            services = loaded.model.services.len(),
                            endpoint_slices = loaded.model.endpoint_slices.len(),
                            "manifests loaded"
                        );
                        if updates.send(Some(Arc::new(loaded.model))).is_err() {
                            return;
                        }
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "manifests do not load; keeping the last good model");
                    }
                    Err(error) => tracing::warn!(%error, "manifest load task failed"),
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}
