//! Chat prompts: [`ChatTemplate`], the single-turn prompt format of a chat model,
//! detected from its Jinja template and rendered as text.

/// The prompt format of a chat model, for one system + one user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n...<|im_end|>\n` (SmolLM2, Qwen, ...).
    ChatMl {
        /// System prompt the template inserts when none is given (SmolLM2's
        /// "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
        default_system: Option<String>,
    },
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
    /// No template: the text as is.
    Plain,
}

impl ChatTemplate {
    /// Picks the format from a Jinja template's text: `<|im_start|>` means
    /// ChatML (with the default system prompt the template hard-codes, if
    /// any), `<|start_header_id|>` means Llama 3, anything else (or none) Plain.
    pub fn detect(template: Option<&str>) -> Self {
        match template {
            Some(t) if t.contains("<|im_start|>") => ChatTemplate::ChatMl {
                default_system: chatml_default_system(t),
            },
            Some(t) if t.contains("<|start_header_id|>") => ChatTemplate::Llama3,
            _ => ChatTemplate::Plain,
        }
    }

    /// The prompt up to and including the opening of the assistant turn, as
    /// the model's template renders `[system?, user]` with
    /// `add_generation_prompt=true`. Special tokens appear as text: encode the
    /// result with `add_special_tokens = false` (the Llama 3 form already
    /// starts with `<|begin_of_text|>`).
    pub fn render(&self, system: Option<&str>, user: &str) -> String {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let mut s = String::new();
                if let Some(sys) = system.or(default_system.as_deref()) {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                s.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
                s
            }
            ChatTemplate::Llama3 => {
                // Llama 3's template trims message contents.
                let mut s = String::from("<|begin_of_text|>");
                if let Some(sys) = system {
                    s.push_str(&format!(
                        "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                        sys.trim()
                    ));
                }
                s.push_str(&format!(
                    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>\
                     <|start_header_id|>assistant<|end_header_id|>\n\n",
                    user.trim()
                ));
                s
            }
            ChatTemplate::Plain => match system {
                Some(sys) => format!("{sys}\n\n{user}"),
                None => user.to_string(),
            },
        }
    }
}

/// A literal system prompt hard-coded in a ChatML template, i.e. text between
/// `<|im_start|>system\n` and `<|im_end|>` inside one Jinja string literal.
fn chatml_default_system(t: &str) -> Option<String> {
    for (open, escaped) in [("<|im_start|>system\n", false), ("<|im_start|>system\\n", true)] {
        let mut rest = t;
        while let Some(pos) = rest.find(open) {
            let after = &rest[pos + open.len()..];
            if let Some(end) = after.find("<|im_end|>") {
                let text = &after[..end];
                let literal = !text.is_empty() && !text.contains(['\'', '"', '{', '}', '+', '\n']);
                if literal {
                    let text = if escaped {
                        text.replace("\\n", "\n")
                    } else {
                        text.to_string()
                    };
                    return Some(text);
                }
            }
            rest = after;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_templates() {
        assert_eq!(ChatTemplate::detect(None), ChatTemplate::Plain);
        assert_eq!(ChatTemplate::detect(Some("{{ x }}")), ChatTemplate::Plain);
        assert_eq!(ChatTemplate::detect(Some("<|start_header_id|>")), ChatTemplate::Llama3);
        // Qwen2.5-style: a concatenation first, then a literal default.
        let qwen = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + \
                    messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- \
                    '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}";
        assert_eq!(
            ChatTemplate::detect(Some(qwen)),
            ChatTemplate::ChatMl {
                default_system: Some("You are Qwen.".into())
            }
        );
        // No literal default.
        let plain_chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + \
                            m['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            ChatTemplate::detect(Some(plain_chatml)),
            ChatTemplate::ChatMl { default_system: None }
        );
    }

    #[test]
    fn render_templates() {
        let chatml = ChatTemplate::ChatMl { default_system: None };
        assert_eq!(
            chatml.render(Some("S"), "U"),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            chatml.render(None, "U"),
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_default = ChatTemplate::ChatMl {
            default_system: Some("D".into()),
        };
        assert!(with_default
            .render(None, "U")
            .starts_with("<|im_start|>system\nD<|im_end|>\n"));
        assert_eq!(
            ChatTemplate::Llama3.render(Some(" S "), "U"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(ChatTemplate::Plain.render(None, "U"), "U");
        assert_eq!(ChatTemplate::Plain.render(Some("S"), "U"), "S\n\nU");
    }
}
