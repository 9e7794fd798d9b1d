//! Chat messages to a prompt, in the model's chat format
//! ([`ChatTemplate`]): a whole conversation, where
//! [`ChatTemplate::render`] takes one system and one user message. For `[system?, user]`
//! both give the same text.

use super::api::ChatMessage;
use super::error::ApiError;
use crate::models::tokenizer::ChatTemplate;

/// Renders `messages` up to the opening of the assistant's turn. Roles: `system` (or
/// `developer`), `user`, `assistant`; the text of special tokens appears as text (encode
/// with `add_special_tokens = false`, except for [`ChatTemplate::Plain`]).
pub fn render_messages(format: &ChatTemplate, messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages".into()), "messages is empty"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(ApiError::invalid(
                    Some(format!("messages[{i}].role")),
                    format!("messages[{i}].role = {r:?} must be system, developer, user or assistant"),
                ))
            }
        };
        turns.push((role, m.text(i)?));
    }
    let mut s = String::new();
    match format {
        ChatTemplate::ChatMl { default_system } => {
            if turns[0].0 != "system" {
                if let Some(sys) = default_system {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
            }
            for (role, text) in &turns {
                s.push_str(&format!("<|im_start|>{role}\n{text}<|im_end|>\n"));
            }
            s.push_str("<|im_start|>assistant\n");
        }
        ChatTemplate::Llama3 => {
            s.push_str("<|begin_of_text|>");
            for (role, text) in &turns {
                s.push_str(&format!(
                    "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                    text.trim()
                ));
            }
            s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
        }
        ChatTemplate::Plain => {
            let texts: Vec<&str> = turns.iter().map(|(_, t)| t.as_str()).collect();
            s = texts.join("\n\n");
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: serde_json::Value::String(content.into()),
        }
    }

    #[test]
    fn system_and_user_render_as_chat_template_render() {
        let formats = [
            ChatTemplate::ChatMl {
                default_system: Some("Be brief.".into()),
            },
            ChatTemplate::ChatMl { default_system: None },
            ChatTemplate::Llama3,
            ChatTemplate::Plain,
        ];
        for f in formats {
            let one = render_messages(&f, &[msg("user", "Hi?")]).unwrap();
            assert_eq!(one, f.render(None, "Hi?"), "{f:?}");
            let two = render_messages(&f, &[msg("system", "S"), msg("user", "Hi?")]).unwrap();
            assert_eq!(two, f.render(Some("S"), "Hi?"), "{f:?}");
        }
        assert!(render_messages(&ChatTemplate::Plain, &[]).is_err());
        let e = render_messages(&ChatTemplate::Plain, &[msg("tool", "x")]).unwrap_err();
        assert!(e.message.contains("messages[0].role"), "{e}");
    }
}
