// Shared by the targets: a private scratch folder per process, rewritten per input.
use std::path::PathBuf;

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pipeline-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[allow(dead_code)]
/// stories260k's config.json, the valid frame around fuzzed weights.
pub const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,"intermediate_size":172,"num_hidden_layers":5,"num_attention_heads":8,"num_key_value_heads":4,"head_dim":8,"vocab_size":512,"max_position_embeddings":512,"hidden_act":"silu","rms_norm_eps":1e-05,"rope_theta":10000.0,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"float32"}"#;
