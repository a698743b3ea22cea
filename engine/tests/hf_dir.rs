//! A Hugging Face directory (sharded safetensors, tokenizer.json, tokenizer_config.json,
//! generation_config.json) loads completely and behaves like the same model as GGUF.

mod common;

use common::{Spec, Variant, Weights, rel_err, tiny_tokenizer_json};
use tandem_engine::chat::ChatMessage;
use tandem_engine::generate::Generator;
use tandem_engine::model::load;
use tandem_engine::sampler::{Sampler, SamplingParams};
use tandem_engine::{KvDtype, LogitsMode, SeqInput};
use tandem_kernels::TensorType;

fn write_hf_dir(w: &Weights, dir: &std::path::Path) {
    w.write_hf(dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    w.write_shards(dir, 3);
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let cfg = serde_json::json!({
        "bos_token": {"content": "<", "lstrip": false},
        "eos_token": "~",
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [94, 95]}"#).unwrap();
}

#[test]
fn sharded_directory_loads_with_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Qwen2), 13);
    write_hf_dir(&w, dir.path());
    assert!(dir.path().join("model-00003-of-00003.safetensors").exists());
    let loaded = load(dir.path()).unwrap();

    let prompt: Vec<u32> = loaded.tokenizer.encode("hi there!\n", false).unwrap();
    // h=71 i=72 Ġ=94 t=83 h=71 e=68 r=81 e=68 !=0 Ċ=95
    assert_eq!(prompt, vec![71, 72, 94, 83, 71, 68, 81, 68, 0, 95]);
    assert_eq!(loaded.tokenizer.decode(&prompt, false).unwrap(), "hi there!\n");
    assert_eq!(loaded.tokenizer.eos_ids, vec![93, 94, 95]);
    assert_eq!(loaded.tokenizer.bos_token.as_deref(), Some("<"));
    let tmpl = loaded.tokenizer.chat_template.as_ref().unwrap();
    assert_eq!(tmpl.render(&[ChatMessage::new("user", "yo")], true).unwrap(), "<user>yo\n<assistant>");

    let mut kv = loaded.model.new_kv_cache(16, 1, KvDtype::F32);
    let seq = SeqInput { tokens: &prompt, start_pos: 0, block_table: &[0], logits: LogitsMode::All };
    let got = loaded.model.forward(&[seq], &mut kv).unwrap().pop().unwrap();
    let want = w.reference_logits(&prompt);
    for (g, r) in got.chunks(96).zip(&want) {
        assert!(rel_err(g, r) < 1e-3);
    }
}

#[test]
fn gguf_and_hugging_face_files_of_one_model_generate_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for variant in [Variant::Llama, Variant::Qwen2, Variant::Llama3Scaled] {
        let w = Weights::random(Spec::tiny(variant), 17);
        let hf = dir.path().join(format!("{variant:?}"));
        std::fs::create_dir(&hf).unwrap();
        write_hf_dir(&w, &hf);
        let gguf = dir.path().join(format!("{variant:?}.gguf"));
        w.write_gguf(&gguf, TensorType::F32);
        let run = |path: &std::path::Path| {
            let loaded = load(path).unwrap();
            let prompt = loaded.tokenizer.encode("abc def", false).unwrap();
            let mut g = Generator::new(&loaded.model, prompt.len() + 20, KvDtype::F32);
            let mut out = Vec::new();
            g.generate(&prompt, 20, &[], &mut Sampler::new(SamplingParams::default()), |id| {
                out.push(id);
                true
            })
            .unwrap();
            (prompt, out)
        };
        let (p1, a) = run(&hf);
        let (p2, b) = run(&gguf);
        assert_eq!(p1, p2, "{variant:?}: tokenizers disagree");
        assert_eq!(a, b, "{variant:?}: greedy tokens differ between formats");
        assert_eq!(a.len(), 20);
    }
}
