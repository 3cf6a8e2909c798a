//! The `files` service source: Kubernetes YAML (or JSON) manifests on disk.
//!
//! A path is one file or a directory whose `*.yaml`, `*.yml` and `*.json` files are read in
//! name order (not recursively). A file holds several documents (`---`), each an object or
//! a `kind: List` (what `kubectl get svc,endpointslices -A -o yaml` prints). Only
//! `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` are loaded; every other object is
//! skipped and listed in [`Loaded::skipped`]. A missing namespace means `default`.
//!
//! One bad document never takes the others down. A YAML stream is cut into documents at
//! its `---` marker lines before anything is parsed, so a syntax error in document 3 leaves
//! documents 1, 2, 4 and 5 in force. Each document (and each item of a List) that does not
//! parse, is not an object, lacks apiVersion, kind or name, has a field of the wrong type,
//! or defines an object already defined earlier (in name order of the files, then document
//! order) is skipped on its own and reported as a [`SourceProblem`] in
//! [`Model::problems`]: the rest is served. Messages name the file, the document (and List
//! item), the object and the field path: `configs/lab/services.yaml: document 2 (Service
//! default/web): spec.ports[0].port: invalid type: string "http", expected i32`.
//!
//! Parsing is bounded: a document nests at most [`MAX_DEPTH`] levels and holds at most
//! [`MAX_DOCUMENT_BYTES`]; a file is at most [`MAX_FILE_BYTES`]. Past a bound the document
//! (or file) is skipped with a clear reason, in time linear in its size.
//!
//! [`ManifestSet`] keeps what each file parsed to, so a change re-reads only the files whose
//! metadata (or inotify events, see [`crate::files_source`]) say they changed.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::{Model, ObjectKey, ObjectKind, SourceProblem};

pub use crate::files_source::watch_files;

/// The deepest nesting of mappings and sequences a document may have. A Service or an
/// EndpointSlice nests about 6 levels (12 with managedFields, 2 more inside a List); the
/// bound stops pathological inputs before they cost more than linear time.
pub const MAX_DEPTH: usize = 64;
/// The largest document: room for a `kind: List` of a large cluster's Services and
/// EndpointSlices (etcd stores at most 1.5 MiB per object).
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;
/// The largest manifest file read at all.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why a manifest path could not be listed. `Display` is the one-line message for users.
/// Problems inside the files are not errors: they are [`SourceProblem`]s of the model.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The reason is part of the message and not an error `source`, so that chains
    /// (`{:#}`) print it once.
    #[error("{}: {}", path.display(), crate::config::io_reason(error))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A loaded model and what was skipped on the way. The documents that could not be used
/// are `model.problems`.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub model: Model,
    /// One line per skipped object, e.g. `lab.yaml: document 3: skipped apps/v1 Deployment lab/web`.
    pub skipped: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

impl Loaded {
    /// The documents and objects that could not be used, one message each.
    pub fn problems(&self) -> &[SourceProblem] {
        &self.model.problems
    }
}

/// Loads the Services and EndpointSlices of `path` (a file or a directory); the documents
/// that could not be used are logged and listed in the model's `problems`.
pub fn load_path(path: &Path) -> Result<Model, ManifestError> {
    let loaded = load(path)?;
    for problem in loaded.problems() {
        tracing::warn!("{problem}");
    }
    Ok(loaded.model)
}

/// Like [`load_path`], also returning the skipped objects and the files read. Fails only
/// when `path` itself cannot be read.
pub fn load(path: &Path) -> Result<Loaded, ManifestError> {
    let mut set = ManifestSet::new(path.to_owned());
    set.refresh(&HashSet::new())?;
    Ok(set.assemble())
}

/// Loads manifests from a string, as if read from `path` (for tests and `check`).
pub fn load_str(path: &Path, text: &str) -> Loaded {
    let parsed = parse_file(path, text.as_bytes());
    let files = vec![(path.to_owned(), Arc::new(parsed))];
    assemble(&files)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files of `path`: itself, or a directory's manifest files sorted by name
/// (none for an empty directory).
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
        // Editors' swap and backup files start with a dot, and so do the `..data`
        // directories of a mounted ConfigMap.
        if name.to_string_lossy().starts_with('.') || !is_manifest(&file) {
            continue;
        }
        // A file removed since the listing is simply not there; symlinks are followed.
        if std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

// ---------------------------------------------------------------------------------------
// Incremental loading

/// What identifies a file's version without reading it: a rewrite changes its ctime (with
/// nanoseconds), a replacement its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

struct CachedFile {
    stamp: FileStamp,
    /// Of the bytes parsed: a touch that leaves the content alone changes nothing.
    content_hash: u64,
    parsed: Arc<ParsedFile>,
}

/// The manifests of a path as last read: each file's parse, kept until its metadata
/// changes, so a change re-reads only the files that changed.
pub struct ManifestSet {
    path: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// Files that could not be read on the last refresh (they keep what they held).
    unreadable: BTreeMap<PathBuf, SourceProblem>,
    /// Files read since the set was made (what inotify and the metadata check save).
    files_read: u64,
}

impl ManifestSet {
    pub fn new(path: PathBuf) -> ManifestSet {
        ManifestSet {
            path,
            files: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            files_read: 0,
        }
    }

    /// The manifest path (a file or a directory).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times a file was read since the set was made.
    pub fn files_read(&self) -> u64 {
        self.files_read
    }

    /// Lists the path and re-reads the files that are new, whose metadata changed, or
    /// whose name is in `touched` (an inotify event named them: a rewrite within the
    /// timestamps' granularity that keeps the size is seen too). Files gone from the
    /// listing are forgotten. Returns whether what the files hold changed. Fails, keeping
    /// everything as it was, when the path itself cannot be listed.
    pub fn refresh(&mut self, touched: &HashSet<OsString>) -> Result<bool, ManifestError> {
        let listed = manifest_files(&self.path)?;
        let mut changed = false;
        let before = self.files.len();
        self.files
            .retain(|file, _| listed.binary_search(file).is_ok());
        changed |= self.files.len() != before;
        self.unreadable
            .retain(|file, _| listed.binary_search(file).is_ok());
        for file in listed {
            let meta = match std::fs::metadata(&file) {
                Ok(meta) => meta,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    changed |= self.files.remove(&file).is_some();
                    continue;
                }
                Err(error) => {
                    changed |= self.unreadable_file(&file, &error);
                    continue;
                }
            };
            let stamp = FileStamp::of(&meta);
            let named = file.file_name().is_some_and(|name| touched.contains(name));
            if let Some(cached) = self.files.get(&file) {
                if cached.stamp == stamp && !named && !self.unreadable.contains_key(&file) {
                    continue;
                }
            }
            self.files_read += 1;
            let bytes = match read_bounded(&file, &meta) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    // Too large to read: the file's objects are not served.
                    let parsed = ParsedFile::problem(
                        &file,
                        "too_large",
                        format!(
                            "{}: {} bytes, more than the {} a manifest file may have; \
                             the file is ignored",
                            file.display(),
                            meta.len(),
                            MAX_FILE_BYTES
                        ),
                    );
                    changed |= self.store(file, stamp, u64::MAX, parsed);
                    continue;
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    changed |= self.files.remove(&file).is_some();
                    continue;
                }
                Err(error) => {
                    changed |= self.unreadable_file(&file, &error);
                    continue;
                }
            };
            let mut hasher = DefaultHasher::new();
            bytes.hash(&mut hasher);
            let content_hash = hasher.finish();
            let was_unreadable = self.unreadable.remove(&file).is_some();
            if let Some(cached) = self.files.get_mut(&file) {
                if cached.content_hash == content_hash {
                    cached.stamp = stamp;
                    changed |= was_unreadable;
                    continue;
                }
            }
            let parsed = parse_file(&file, &bytes);
            changed |= self.store(file, stamp, content_hash, parsed) || was_unreadable;
        }
        Ok(changed)
    }

    fn store(&mut self, file: PathBuf, stamp: FileStamp, hash: u64, parsed: ParsedFile) -> bool {
        self.unreadable.remove(&file);
        self.files.insert(
            file,
            CachedFile {
                stamp,
                content_hash: hash,
                parsed: Arc::new(parsed),
            },
        );
        true
    }

    /// A listed file that cannot be read keeps what it held when last read.
    fn unreadable_file(&mut self, file: &Path, error: &std::io::Error) -> bool {
        let kept = if self.files.contains_key(file) {
            "; what it held when last read is kept"
        } else {
            ""
        };
        let problem = SourceProblem {
            file: file.display().to_string(),
            reason: "unreadable",
            message: format!(
                "{}: {}{kept}",
                file.display(),
                crate::config::io_reason(error)
            ),
        };
        self.unreadable.insert(file.to_owned(), problem.clone()) != Some(problem)
    }

    /// The model of every file as last read, with every problem.
    pub fn assemble(&self) -> Loaded {
        let files: Vec<(PathBuf, Arc<ParsedFile>)> = self
            .files
            .iter()
            .map(|(file, cached)| (file.clone(), cached.parsed.clone()))
            .collect();
        let mut loaded = assemble(&files);
        for (file, problem) in &self.unreadable {
            if !loaded.files.contains(file) {
                loaded.files.push(file.clone());
            }
            loaded.model.problems.push(problem.clone());
        }
        loaded
    }
}

/// Reads a file of at most [`MAX_FILE_BYTES`] (`None` when it is larger).
fn read_bounded(file: &Path, meta: &std::fs::Metadata) -> std::io::Result<Option<Vec<u8>>> {
    if meta.len() > MAX_FILE_BYTES {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(file)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Merges the files' objects in order: the first definition of an object wins, a later
/// one is a `duplicate` problem.
fn assemble(files: &[(PathBuf, Arc<ParsedFile>)]) -> Loaded {
    let mut loaded = Loaded::default();
    for (file, parsed) in files {
        loaded.files.push(file.clone());
        loaded.skipped.extend(parsed.skipped.iter().cloned());
        // Problems and objects are merged in document order, so messages read in file order.
        let mut problems = parsed.problems.iter().peekable();
        for object in &parsed.objects {
            while let Some(problem) = problems.next_if(|(at, _)| *at < object.document) {
                loaded.model.problems.push(problem.1.clone());
            }
            let key = (object.kind(), object.key.clone());
            if let Some(first) = loaded.model.origins.get(&key) {
                loaded.model.problems.push(SourceProblem {
                    file: file.display().to_string(),
                    reason: "duplicate",
                    message: format!(
                        "{}: {}: {} {} is already defined in {first}; this definition is \
                         ignored",
                        file.display(),
                        object.location,
                        object.kind(),
                        object.key
                    ),
                });
                continue;
            }
            loaded
                .model
                .origins
                .insert(key, format!("{}: {}", file.display(), object.location));
            match &object.object {
                Object::Service(service) => {
                    loaded
                        .model
                        .services
                        .insert(object.key.clone(), service.clone());
                }
                Object::EndpointSlice(slice) => {
                    loaded
                        .model
                        .endpoint_slices
                        .insert(object.key.clone(), slice.clone());
                }
            }
        }
        loaded
            .model
            .problems
            .extend(problems.map(|(_, problem)| problem.clone()));
    }
    loaded
}

// ---------------------------------------------------------------------------------------
// Parsing one file

enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
}

struct ParsedObject {
    /// Index of the document in the file (0-based), for ordering.
    document: usize,
    /// `document N (Kind namespace/name)`, `document N item M (...)`.
    location: String,
    key: ObjectKey,
    object: Object,
}

impl ParsedObject {
    fn kind(&self) -> ObjectKind {
        match self.object {
            Object::Service(_) => ObjectKind::Service,
            Object::EndpointSlice(_) => ObjectKind::EndpointSlice,
        }
    }
}

/// What one file holds: its objects in document order, what was skipped, and the problems
/// (each with the index of its document).
#[derive(Default)]
struct ParsedFile {
    objects: Vec<ParsedObject>,
    skipped: Vec<String>,
    problems: Vec<(usize, SourceProblem)>,
}

impl ParsedFile {
    fn problem(file: &Path, reason: &'static str, message: String) -> ParsedFile {
        ParsedFile {
            problems: vec![(
                0,
                SourceProblem {
                    file: file.display().to_string(),
                    reason,
                    message,
                },
            )],
            ..ParsedFile::default()
        }
    }
}

/// A problem of one document, before it is placed in its file.
struct DocumentProblem {
    reason: &'static str,
    /// `document N (...): what`.
    message: String,
}

fn parse_file(path: &Path, bytes: &[u8]) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let documents = if is_json {
        vec![Document {
            first_line: 1,
            bytes,
            has_content: true,
        }]
    } else {
        split_documents(bytes)
    };
    for (index, document) in documents.iter().enumerate() {
        let location = format!("document {}", index + 1);
        let mut problems = Vec::new();
        match document.parse(is_json) {
            Ok(Some(value)) => load_document(
                &mut parsed,
                path,
                index,
                location,
                value,
                true,
                &mut problems,
            ),
            Ok(None) => {} // an empty document (e.g. a trailing `---`)
            Err((reason, what)) => problems.push(DocumentProblem {
                reason,
                message: format!("{location}: {what}"),
            }),
        }
        parsed.problems.extend(problems.into_iter().map(|problem| {
            (
                index,
                SourceProblem {
                    file: path.display().to_string(),
                    reason: problem.reason,
                    message: format!("{}: {}", path.display(), problem.message),
                },
            )
        }));
    }
    parsed
}

/// One document of a file: its first line (1-based) and its bytes.
struct Document<'a> {
    first_line: usize,
    bytes: &'a [u8],
    /// Whether it holds more than markers, blanks, comments and directives.
    has_content: bool,
}

/// Cuts a YAML stream into documents at its `---` marker lines. YAML ends a document at a
/// `---` at the start of a line whatever the context (even inside a block scalar), so the
/// cut is exact, and one document's syntax error cannot hide the others from the parser.
/// Comments, blank lines and directives before a marker belong to the document it opens;
/// an explicit empty document (`---` followed by nothing) counts, as YAML counts it.
fn split_documents(bytes: &[u8]) -> Vec<Document<'_>> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let (mut opened_by_marker, mut has_content) = (false, false);
    let (mut offset, mut line_number) = (0, 1);
    while offset < bytes.len() {
        let end = bytes[offset..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |at| offset + at);
        let line = &bytes[offset..end];
        if is_document_marker(line) {
            if has_content || opened_by_marker {
                documents.push(Document {
                    first_line: start_line,
                    bytes: &bytes[start..offset],
                    has_content,
                });
                (start, start_line) = (offset, line_number);
            }
            opened_by_marker = true;
            has_content = is_content(&line[3..]);
        } else if !has_content && line.first() != Some(&b'%') {
            has_content = is_content(line);
        }
        offset = end + 1;
        line_number += 1;
    }
    if has_content || opened_by_marker {
        documents.push(Document {
            first_line: start_line,
            bytes: &bytes[start..],
            has_content,
        });
    }
    documents
}

fn is_document_marker(line: &[u8]) -> bool {
    line.starts_with(b"---") && matches!(line.get(3), None | Some(b' ' | b'\t' | b'\r'))
}

/// Whether a line holds more than blanks and a comment.
fn is_content(line: &[u8]) -> bool {
    let text = line.trim_ascii_start();
    !(text.is_empty() || text[0] == b'#')
}

impl Document<'_> {
    /// The document's value: `None` when it is empty, `Err((reason, what))` when it cannot
    /// be parsed within the bounds.
    fn parse(&self, is_json: bool) -> Result<Option<Value>, (&'static str, String)> {
        if self.bytes.len() > MAX_DOCUMENT_BYTES {
            return Err((
                "too_large",
                format!(
                    "{} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have; \
                     the document is ignored",
                    self.bytes.len()
                ),
            ));
        }
        let text = std::str::from_utf8(self.bytes).map_err(|e| {
            (
                "syntax",
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.valid_up_to()
                ),
            )
        })?;
        let value = if is_json {
            serde_json::from_str::<Value>(text).map_err(|e| {
                let reason = if e.to_string().starts_with("recursion limit exceeded") {
                    "too_deep"
                } else {
                    "syntax"
                };
                (reason, e.to_string())
            })?
        } else {
            if !self.has_content {
                return Ok(None);
            }
            parse_yaml(text, self.first_line)?
        };
        if depth(&value) > MAX_DEPTH {
            return Err(too_deep());
        }
        Ok((!value.is_null()).then_some(value))
    }
}

fn too_deep() -> (&'static str, String) {
    (
        "too_deep",
        format!(
            "nested more than {MAX_DEPTH} levels deep (the limit of a manifest document); \
             the document is ignored"
        ),
    )
}

/// Parses one YAML document within the bounds; errors say the line and column in the file.
fn parse_yaml(text: &str, first_line: usize) -> Result<Value, (&'static str, String)> {
    use serde_saphyr::budget::BudgetBreach;
    // Every node takes at least a byte, so the byte bound also bounds nodes and events.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 1,
            max_nodes: MAX_DOCUMENT_BYTES,
            max_events: 2 * MAX_DOCUMENT_BYTES + 16,
        },
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Value>(text, options).map_err(|error| {
        let reason = match error.without_snippet() {
            serde_saphyr::Error::Budget {
                breach: BudgetBreach::Depth { .. },
                ..
            } => return too_deep(),
            serde_saphyr::Error::Budget { .. } => "too_large",
            _ => "syntax",
        };
        let rendered = error.render_with_options(serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
            line_offset: (first_line - 1) as u64,
        });
        // The parser's own nesting limit (flow collections) says it this way.
        if rendered.starts_with("recursion limit exceeded") {
            let (reason, what) = too_deep();
            return (reason, format!("{what} ({rendered})"));
        }
        (reason, rendered)
    })
}

/// The nesting depth of a value (a scalar is 0). Bounded by the parsers' own limits.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
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
            name: text(metadata.and_then(|m| m.get("name"))).filter(|n| !n.is_empty()),
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

/// Adds the object(s) of one document (or List item) to `parsed`; what cannot be used goes
/// to `problems`, the rest stays.
fn load_document(
    parsed: &mut ParsedFile,
    path: &Path,
    document: usize,
    location: String,
    value: Value,
    allow_list: bool,
    problems: &mut Vec<DocumentProblem>,
) {
    let mut problem = |reason, location: &str, what: String| {
        problems.push(DocumentProblem {
            reason,
            message: format!("{location}: {what}"),
        })
    };
    if value.is_null() {
        return;
    }
    if !value.is_object() {
        let found = match &value {
            Value::Array(_) => "a sequence",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            _ => "a boolean",
        };
        problem(
            "not_an_object",
            &location,
            format!("expected a Kubernetes object (a mapping), found {found}"),
        );
        return;
    }
    let header = Header::of(&value);
    let described = format!("{location} ({header})");
    match (header.api_version.as_str(), header.kind.as_str()) {
        ("v1", "List") | ("", "List") if allow_list => {
            let Value::Object(mut fields) = value else {
                unreachable!("checked to be an object above")
            };
            match fields.remove("items") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (index, item) in items.into_iter().enumerate() {
                        load_document(
                            parsed,
                            path,
                            document,
                            format!("{location} item {}", index + 1),
                            item,
                            false,
                            problems,
                        );
                    }
                }
                Some(_) => problem(
                    "invalid_field",
                    &location,
                    "items: expected a sequence".to_owned(),
                ),
            }
        }
        ("v1", "Service") if header.name.is_some() => match typed::<Service>(value) {
            Ok(mut service) => {
                let key = default_namespace(&mut service.metadata);
                parsed.objects.push(ParsedObject {
                    document,
                    location: described,
                    key,
                    object: Object::Service(Arc::new(service)),
                });
            }
            Err(what) => problem("invalid_field", &described, what),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") if header.name.is_some() => {
            match typed::<EndpointSlice>(value) {
                Ok(mut slice) => {
                    let key = default_namespace(&mut slice.metadata);
                    parsed.objects.push(ParsedObject {
                        document,
                        location: described,
                        key,
                        object: Object::EndpointSlice(Arc::new(slice)),
                    });
                }
                Err(what) => problem("invalid_field", &described, what),
            }
        }
        ("v1", "Service") | ("discovery.k8s.io/v1", "EndpointSlice") => problem(
            "missing_field",
            &described,
            "metadata.name: missing".to_owned(),
        ),
        ("", _) | (_, "") => problem(
            "missing_field",
            &described,
            "apiVersion and kind are required".to_owned(),
        ),
        (api_version, kind) => {
            let name = header.name.as_deref().unwrap_or("?");
            parsed.skipped.push(format!(
                "{}: {location}: skipped {api_version} {kind} {}/{name}",
                path.display(),
                header.namespace
            ));
        }
    }
}

/// Defaults the namespace and returns the object's key (its name is known to be set).
fn default_namespace(
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    let namespace = metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    metadata.namespace = Some(namespace.clone());
    ObjectKey::new(namespace, metadata.name.clone().unwrap_or_default())
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
