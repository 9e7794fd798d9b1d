//! Models from the Hugging Face Hub (feature `hub`; without it, a clear error).

use super::*;

#[cfg(feature = "hub")]
pub(super) fn resolve_hub(repo: &str, file: Option<&str>, show_progress: bool) -> Result<ResolvedModel> {
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
pub(super) fn resolve_hub(repo: &str, file: Option<&str>, _show_progress: bool) -> Result<ResolvedModel> {
    let what = match file {
        Some(f) => format!("{repo}:{f}"),
        None => repo.to_string(),
    };
    Err(Error::Model(format!(
        "cannot download {what}: built without the `hub` feature; download the files yourself \
         and pass --model PATH (a .gguf file or a folder with config.json and *.safetensors)"
    )))
}
