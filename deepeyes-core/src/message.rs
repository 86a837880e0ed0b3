//! Messages with interleaved text and image parts, and conversations of them.
//!
//! The agent loop works on token ids for speed; these types are the structured view of the same
//! conversation, for building prompts by hand, for traces, and for backends that take messages
//! (an OpenAI-style server) rather than tokens.

use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::protocol::{IM_START, IMAGE_MARKERS, Rendered, chatml_message};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt.
    System,
    /// The user, and tool observations (DeepEyes returns them as user turns).
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role's name in ChatML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// Text.
    Text(String),
    /// An image, shown to the model where it stands in the text.
    Image(Image),
}

/// A message: a role and interleaved text and image parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// The parts, in order.
    pub parts: Vec<ContentPart>,
}

impl Message {
    /// A text-only message.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            parts: vec![ContentPart::Text(text.into())],
        }
    }

    /// Appends a text part.
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.parts.push(ContentPart::Text(text.into()));
        self
    }

    /// Appends an image part.
    #[must_use]
    pub fn with_image(mut self, image: Image) -> Self {
        self.parts.push(ContentPart::Image(image));
        self
    }

    /// The images of the message, in order.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.parts.iter().filter_map(|p| match p {
            ContentPart::Image(im) => Some(im),
            ContentPart::Text(_) => None,
        })
    }

    /// The content as the model reads it: each text part as outside text (a spelling of a
    /// special token in it stays text), each image as
    /// `<|vision_start|><|image_pad|><|vision_end|>`.
    pub fn render_content(&self) -> Rendered {
        let mut out = Rendered::default();
        for part in &self.parts {
            match part {
                ContentPart::Text(t) => out.push_untrusted(t),
                ContentPart::Image(_) => out.push_trusted(IMAGE_MARKERS),
            }
        }
        out
    }
}

/// A conversation: messages in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    /// The messages.
    pub messages: Vec<Message>,
}

impl Conversation {
    /// An empty conversation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a message.
    #[must_use]
    pub fn with(mut self, message: Message) -> Self {
        self.messages.push(message);
        self
    }

    /// Every image of the conversation, in the order the model sees them.
    pub fn images(&self) -> Vec<Image> {
        self.messages
            .iter()
            .flat_map(|m| m.images().cloned())
            .collect()
    }

    /// The ChatML of the conversation, rendered as the protocol renders prompts (its text
    /// parts are outside text: encode it with [`Rendered::encode`]); with `open_assistant` a
    /// final assistant header is added so the model continues from there.
    pub fn render(&self, open_assistant: bool) -> Rendered {
        let mut out = Rendered::default();
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push_trusted("\n");
            }
            out.push(&chatml_message(m.role.as_str(), &m.render_content()));
        }
        if open_assistant {
            if !self.messages.is_empty() {
                out.push_trusted("\n");
            }
            out.push_trusted(&format!("{IM_START}assistant\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::render_prompt;

    #[test]
    fn renders_like_the_protocol() {
        let image = Image::from_raw(2, 2, vec![0; 12]).unwrap();
        let conv = Conversation::new()
            .with(Message::text(Role::System, "sys"))
            .with(
                Message::text(Role::User, "")
                    .with_image(image.clone())
                    .with_text("What is it?"),
            );
        let mut user = Rendered::trusted(IMAGE_MARKERS);
        user.push_untrusted("What is it?");
        // The same text, with the same stretches of it template text.
        assert_eq!(
            conv.render(true),
            render_prompt(&Rendered::untrusted("sys"), &user)
        );
        assert_eq!(conv.images(), vec![image]);
    }
}
