//! Downstream model code over [`SparseKvCache`](crate::SparseKvCache): a Llama-family
//! decoder (Llama 2/3, SmolLM2, Mistral-style, Qwen2 with q/k/v bias), weights from GGUF
//! or a Hugging Face folder, tokenizers, chat templates, sampling and model fetching.

pub mod chat_template;
pub mod config;
pub mod fetch;
pub mod generation;
mod gguf_meta;
pub mod llama;
pub mod loader;
pub mod needle;
pub mod passkey;
pub mod random;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::Llama;
pub use loader::{dtype_by_name, load_model, LoadedModel};
pub use sampling::{Sampler, SamplingConfig};
