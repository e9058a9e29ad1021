//! The GPT-2-style byte-level BPE tokenizer of a GGUF model (`tokenizer.ggml.model = "gpt2"`),
//! built from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges` with the `tokenizers` crate,
//! and the model's chat template (ChatML, recognised rather than run through a Jinja engine).
//!
//! Pre-tokenization follows llama.cpp's `llama-vocab.cpp`: for `tokenizer.ggml.pre = "smollm"`
//! (and the other types in the same case: starcoder, refact, command-r, codeshell, exaone,
//! minerva) each digit is split off (`\p{N}`), then the GPT-2 regex applies; for `gpt-2` /
//! `default` only the GPT-2 regex applies. Control and user-defined tokens written in the text
//! (e.g. `<|im_start|>`) are recognised as the special token, as llama.cpp does with
//! `parse_special`.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use super::gguf::Gguf;
use super::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A recognised chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n`, with the system message the template inserts when
    /// the conversation has none (SmolLM2: "You are a helpful AI assistant named SmolLM, ...").
    ChatMl { default_system: Option<String> },
}

impl ChatTemplate {
    /// Recognises a Jinja chat template by its markers.
    pub fn recognise(template: &str) -> Result<ChatTemplate> {
        if template.contains("<|im_start|>") && template.contains("<|im_end|>") {
            // A literal default system turn: '<|im_start|>system\n...<|im_end|>' inside a string.
            let marker = "<|im_start|>system\n";
            let default_system = template.find(marker).and_then(|i| {
                let rest = &template[i + marker.len()..];
                let body = &rest[..rest.find("<|im_end|>")?];
                let literal = !body.contains(['{', '}', '\'', '"', '+']);
                literal.then(|| body.to_string())
            });
            return Ok(ChatTemplate::ChatMl { default_system });
        }
        let head: String = template.chars().take(60).collect();
        Err(Error::new(format!(
            "unrecognised chat template (only ChatML is supported): {head:?}..."
        )))
    }

    /// Renders `messages`, then the assistant prompt when `add_generation_prompt`.
    pub fn apply(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let ChatTemplate::ChatMl { default_system } = self;
        let mut s = String::new();
        if let Some(sys) = default_system {
            if messages.first().is_none_or(|m| m.role != "system") {
                s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
            }
        }
        for m in messages {
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        s
    }
}

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    tokens: Vec<String>,
    /// Ids of control / user-defined tokens (decoded as their text, never byte-mapped).
    special: Vec<bool>,
    byte_of_char: HashMap<char, u8>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Ids that end generation: eos, and other control tokens such as `<|endoftext|>`.
    end_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
    /// Whether the model wants a BOS token before a prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.tokens.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("chat_template", &self.chat_template)
            .finish()
    }
}

/// GPT-2's byte -> printable char map (`bytes_to_unicode`).
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::new(format!(
                "unsupported tokenizer {model:?} (only the byte-level BPE \"gpt2\" is implemented)"
            )));
        }
        let pre = match g.get("tokenizer.ggml.pre") {
            Some(_) => g.get_str("tokenizer.ggml.pre")?,
            None => "default",
        };
        let split_digits = match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => true,
            "gpt-2" | "default" => false,
            other => {
                return Err(Error::new(format!(
                    "unsupported pre-tokenizer {other:?} (supported: smollm, starcoder, gpt-2, ...)"
                )))
            }
        };
        let tokens: Vec<String> = g
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let merges_raw = g.get_str_array("tokenizer.ggml.merges")?;
        let n = tokens.len();
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(a) => {
                return Err(Error::new(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    a.len()
                )))
            }
            None => vec![1; n],
        };
        let special: Vec<bool> = types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .collect();

        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // Duplicate token strings exist in some vocabularies: keep the first id.
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                Error::new(format!("tokenizer merge #{i} {m:?} is not two tokens"))
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::new(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = if split_digits {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&special)
            .filter(|(_, &s)| s)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<Option<u32>> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                    _ => Err(Error::new(format!(
                        "{key} {v:?} is not a token id below {n}"
                    ))),
                },
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_id = id("tokenizer.ggml.eos_token_id")?;
        let mut end_ids: Vec<u32> = eos_id.into_iter().collect();
        for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(&i) = tokens
                .iter()
                .position(|t| t == name)
                .filter(|&i| special[i])
                .as_ref()
            {
                end_ids.push(i as u32);
            }
        }
        if let Some(eot) = id("tokenizer.ggml.eot_token_id")? {
            end_ids.push(eot);
        }
        let chat_template = match g.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(ChatTemplate::recognise(
                g.get_str("tokenizer.chat_template")?,
            )?),
        };
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let byte_of_char = byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Tokenizer {
            inner,
            tokens,
            special,
            byte_of_char,
            bos_id,
            eos_id,
            end_ids,
            chat_template,
            add_bos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's string as stored in the vocabulary.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text` (special tokens written in the text are recognised; no BOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::new(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The bytes a token stands for (control tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.special[id as usize] {
            return t.as_bytes().to_vec();
        }
        t.chars()
            .map(|c| self.byte_of_char.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| t.as_bytes().to_vec())
    }

    /// Text of `ids` (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` ends generation (eos, end-of-turn, end-of-text).
    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// Whether `id` is a control or user-defined token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            Error::new("the model has no chat template (tokenizer.chat_template)")
        })?;
        Ok(t.apply(messages, add_generation_prompt))
    }
}

/// Turns a stream of token bytes into text, holding back an incomplete UTF-8 sequence.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (incomplete sequences become U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
