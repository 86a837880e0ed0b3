//! Items made ready to be asked: options shuffled (by a seed derived from the run seed and the
//! item id) and written into the question, and the reference answer a reward or a grader sees.
//! Training, evaluation and data selection ask items exactly this way.

use crate::agent::Task;
use crate::dataset::{Item, option_letter};
use crate::image::Image;
use crate::rng::Rng;

/// An item ready to be asked: its options in the order shown and the prompt question.
#[derive(Debug, Clone)]
pub struct PreparedItem {
    /// The dataset item.
    pub item: Item,
    /// `order[k]` is the stored index of the option shown as letter `k`.
    pub order: Vec<usize>,
    /// The correct letter in the shown order (multiple-choice items).
    pub correct_letter: Option<char>,
    /// The question as the model sees it, options included.
    pub question: String,
    /// The base seed of this item's samples.
    pub seed: u64,
}

/// FNV-1a, a stable hash so that an item's seed depends on its id, not on its position.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Orders `item`'s options (shuffled when `shuffle`) and writes the question with them as
/// `Question: …\nOptions:\nA. …` lines, DeepEyes' layout.
pub fn prepare_item(item: Item, seed: u64, shuffle: bool) -> PreparedItem {
    let item_seed = Rng::derive_seed(seed, &[stable_hash(&item.id)]);
    let mut order: Vec<usize> = (0..item.options.len()).collect();
    if shuffle {
        Rng::new(Rng::derive_seed(item_seed, &[0])).shuffle(&mut order);
    }
    let correct_letter = item
        .correct_option
        .and_then(|c| order.iter().position(|&o| o == c))
        .and_then(option_letter);
    let mut question = if item.options.is_empty() {
        item.question.clone()
    } else {
        format!("Question: {}\nOptions:", item.question)
    };
    for (k, &o) in order.iter().enumerate() {
        if let Some(letter) = option_letter(k) {
            question.push_str(&format!("\n{letter}. {}", item.options[o]));
        }
    }
    PreparedItem {
        item,
        order,
        correct_letter,
        question,
        seed: Rng::derive_seed(item_seed, &[1]),
    }
}

impl PreparedItem {
    /// What the agent is asked: this item's question, as shown, about `images` (its decoded
    /// images, or stand-ins such as a crop of the ground-truth region).
    pub fn task(&self, images: Vec<Image>) -> Task {
        Task {
            question: self.question.clone(),
            images,
        }
    }

    /// The reference answer as a reward function and a grader see it: the correct option's
    /// letter as shown, or the answer text of an open question.
    pub fn ground_truth(&self) -> String {
        self.correct_letter
            .map_or_else(|| self.item.answer.clone(), |l| l.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::dataset::Position;

    fn mc_item(id: &str) -> Item {
        Item {
            id: id.into(),
            data_source: "vstar".into(),
            question: "What is the colour of the cup?".into(),
            options: vec!["red".into(), "blue".into(), "green".into(), "white".into()],
            correct_option: Some(0),
            answer: "red".into(),
            images: vec![],
            boxes: vec![],
            category: Some("direct_attributes".into()),
            prompt: vec![],
            extra: serde_json::Map::new(),
            position: Position::file("x"),
        }
    }

    #[test]
    fn shuffling_is_seeded_by_id_and_tracks_the_answer() {
        let a = prepare_item(mc_item("one"), 7, true);
        let again = prepare_item(mc_item("one"), 7, true);
        assert_eq!(a.order, again.order);
        let letter = a.correct_letter.unwrap();
        let shown = a.order[(letter as u8 - b'A') as usize];
        assert_eq!(shown, 0, "the correct letter points at the stored answer");
        assert!(a.question.contains(&format!("{letter}. red")));
        // Across ids the answer lands on different letters.
        let letters: HashSet<char> = (0..40)
            .map(|i| {
                prepare_item(mc_item(&format!("id{i}")), 7, true)
                    .correct_letter
                    .unwrap()
            })
            .collect();
        assert!(letters.len() >= 3, "{letters:?}");
        let fixed = prepare_item(mc_item("one"), 7, false);
        assert_eq!(fixed.order, vec![0, 1, 2, 3]);
        assert_eq!(fixed.correct_letter, Some('A'));
        assert!(fixed.question.starts_with("Question: What is"));
        assert_eq!(fixed.ground_truth(), "A");
        let open = prepare_item(
            Item {
                options: vec![],
                correct_option: None,
                ..mc_item("o")
            },
            7,
            true,
        );
        assert_eq!(open.ground_truth(), "red");
    }
}
