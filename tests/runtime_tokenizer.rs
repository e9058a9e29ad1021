//! Tokenizer: a tiny byte-level BPE built in memory (always runs), and the real SmolLM2 vocabulary
//! (when fetched) against ids from scripts/ref_tokenize.py, plus round trips and the chat template.

mod runtime_support;

use runtime_support::{write_gguf, V};
use tessera::runtime::cli;
use tessera::runtime::gguf::Gguf;
use tessera::runtime::tokenizer::{
    byte_to_char, ChatMessage, ChatTemplate, StreamDecoder, Tokenizer,
};

const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Control tokens 0..3, then the 256 byte tokens, then merged tokens.
fn tiny_tokenizer(pre: &str) -> Tokenizer {
    let b2c = byte_to_char();
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut types = vec![V::I32(3); 3];
    tokens.extend(b2c.iter().map(|c| c.to_string()));
    types.extend((0..256).map(|_| V::I32(1)));
    let merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(V::I32(1));
    }
    let kv = vec![
        ("tokenizer.ggml.model", V::str("gpt2")),
        ("tokenizer.ggml.pre", V::str(pre)),
        ("tokenizer.ggml.tokens", V::strs(&tokens)),
        ("tokenizer.ggml.token_type", V::Arr(5, types)),
        ("tokenizer.ggml.merges", V::strs(&merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.chat_template", V::str(SMOL_TEMPLATE)),
    ];
    let g = Gguf::from_bytes(write_gguf(&kv, &[], None)).expect("gguf");
    Tokenizer::from_gguf(&g).expect("tokenizer")
}

const TEXTS: &[&str] = &[
    "Hello world",
    "The capital of France is",
    "  leading spaces and  double  spaces ",
    "Numbers: 12345, 3.14159 and 1e-5!",
    "Unicode: café, naïve, 日本語, emoji 🦀🚀, Ünïcödé",
    "def f(x):\n    return x**2  # square\n\tTabs\n\n\nnewlines",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't won't I'm we'll they've she'd it's",
    "x=1000000;y = [3.5e10, -42]",
    "    indented    code",
    "Привет мир! Γειά σου",
    "",
    " ",
];

#[test]
fn tiny_bpe_merges_and_splits_digits() {
    let t = tiny_tokenizer("smollm");
    let id = |s: &str| {
        3 + 256
            + ["he", "ll", "hell", "Ġw", "or", "Ġwor", "12"]
                .iter()
                .position(|x| *x == s)
                .expect("merged token") as u32
    };
    let byte = |b: u8| 3 + u32::from(b);
    assert_eq!(
        t.encode("hello world").expect("enc"),
        vec![id("hell"), byte(b'o'), id("Ġwor"), byte(b'l'), byte(b'd')]
    );
    // smollm splits every digit, so the "1 2" merge never applies; gpt-2 uses it.
    assert_eq!(
        t.encode("123").expect("enc"),
        vec![byte(b'1'), byte(b'2'), byte(b'3')]
    );
    let g2 = tiny_tokenizer("gpt-2");
    assert_eq!(g2.encode("123").expect("enc"), vec![id("12"), byte(b'3')]);
    // Control tokens in the text are recognised.
    assert_eq!(
        t.encode("<|im_start|>he<|im_end|>").expect("enc"),
        vec![1, id("he"), 2]
    );
    assert!(t.is_end(2) && t.is_end(0) && !t.is_end(1));
    for s in TEXTS {
        let ids = t.encode(s).expect("enc");
        assert_eq!(t.decode(&ids), *s, "round trip {s:?}");
    }
}

#[test]
fn unknown_tokenizers_are_clean_errors() {
    let kv = vec![("tokenizer.ggml.model", V::str("llama"))];
    let g = Gguf::from_bytes(write_gguf(&kv, &[], None)).expect("gguf");
    let e = Tokenizer::from_gguf(&g).expect_err("spm");
    assert!(e.to_string().contains("unsupported tokenizer"), "{e}");
    let kv = vec![
        ("tokenizer.ggml.model", V::str("gpt2")),
        ("tokenizer.ggml.pre", V::str("qwen2")),
    ];
    let g = Gguf::from_bytes(write_gguf(&kv, &[], None)).expect("gguf");
    let e = Tokenizer::from_gguf(&g).expect_err("pre");
    assert!(e.to_string().contains("pre-tokenizer"), "{e}");
}

#[test]
fn chatml_template_is_recognised() {
    let t = ChatTemplate::recognise(SMOL_TEMPLATE).expect("chatml");
    let s = t.apply(&[ChatMessage::new("user", "Hi")], true);
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let s = t.apply(
        &[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ],
        false,
    );
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    assert!(ChatTemplate::recognise("{{ bos_token }}[INST] ...").is_err());
}

#[test]
fn stream_decoder_holds_partial_utf8() {
    let mut d = StreamDecoder::default();
    let crab = "🦀".as_bytes();
    assert_eq!(d.push(&crab[..1]), "");
    assert_eq!(d.push(&crab[1..3]), "");
    assert_eq!(d.push(&[crab[3], b'a']), "🦀a");
    assert_eq!(d.push(&[0xff, b'b']), "\u{fffd}b");
    assert_eq!(d.push(&crab[..2]), "");
    assert_eq!(d.finish(), "\u{fffd}");
}

/// Ids from `python3 scripts/ref_tokenize.py MODEL.gguf TEXT...` (the `tokenizers` package with
/// the GGUF's vocab and merges, llama.cpp's smollm pre-tokenization).
const KNOWN: &[(&str, &[u32])] = &[
    ("Hello world", &[19556, 905]),
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    (
        "  leading spaces and  double  spaces",
        &[216, 2899, 5600, 284, 216, 5561, 216, 5600],
    ),
    (
        "Numbers: 12345, 3.14159 and 1e-5!",
        &[
            39006, 42, 216, 33, 34, 35, 36, 37, 28, 216, 35, 30, 33, 36, 33, 37, 41, 284, 216, 33,
            85, 29, 37, 17,
        ],
    ),
    (
        "Unicode: café, naïve, 日本語, emoji 🦀🚀, Ünïcödé",
        &[
            3706, 15817, 42, 37366, 28, 15486, 46494, 28, 17097, 241, 115, 40993, 179, 120, 248,
            28, 649, 33777, 15107, 116, 218, 10813, 244, 218, 28, 5549, 246, 94, 25972, 83, 7466,
            84, 2756,
        ],
    ),
    (
        "def f(x):\n    return x**2  # square\n\tTabs\n\n\nnewlines",
        &[
            1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198, 197, 68, 7366,
            1116, 198, 2241, 5110,
        ],
    ),
    (
        "<|im_start|>user\nHi there<|im_end|>\n",
        &[1, 4093, 198, 26843, 665, 2, 198],
    ),
    (
        "don't won't I'm we'll they've she'd it's",
        &[
            12420, 982, 3763, 982, 339, 5248, 392, 3060, 502, 3543, 1041, 6737, 357, 506,
        ],
    ),
    (
        "x=1000000;y = [3.5e10, -42]",
        &[
            104, 45, 33, 32, 32, 32, 32, 32, 32, 43, 105, 446, 933, 35, 30, 37, 85, 33, 32, 28,
            731, 36, 34, 77,
        ],
    ),
    ("    indented    code", &[333, 641, 6574, 333, 2909]),
    (
        "Привет мир! Γειά σου",
        &[
            155, 249, 46879, 16464, 32547, 41337, 7872, 9175, 17, 5664, 237, 14240, 12001, 26112,
            32437, 39963,
        ],
    ),
    (" ", &[216]),
];

fn real_tokenizer() -> Option<Tokenizer> {
    let path = std::env::var_os("TESSERA_TEST_MODEL")
        .map(std::path::PathBuf::from)
        .or_else(cli::default_model_path)
        .filter(|p| p.is_file());
    let Some(path) = path else {
        println!("SKIPPED: SmolLM2 GGUF not in the cache; run scripts/fetch-model.sh");
        return None;
    };
    let g = Gguf::open(&path).expect("open model");
    Some(Tokenizer::from_gguf(&g).expect("tokenizer"))
}

#[test]
fn real_vocab_matches_reference_ids_and_round_trips() {
    let Some(t) = real_tokenizer() else { return };
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos_id, t.eos_id), (Some(1), Some(2)));
    for (text, ids) in KNOWN {
        assert_eq!(t.encode(text).expect("encode"), *ids, "{text:?}");
    }
    for s in TEXTS {
        let ids = t.encode(s).expect("encode");
        assert_eq!(t.decode(&ids), *s, "round trip {s:?}");
    }
    let chat = t
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .expect("template");
    assert!(chat.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    let ids = cli::prompt_tokens(&t, "Hi", true).expect("prompt");
    assert_eq!(ids[0], 1, "chat prompt starts with <|im_start|>");
    assert_eq!(
        ids[ids.len() - 4..],
        [1, 520, 9531, 198],
        "ends with <|im_start|>assistant"
    );
}
