//! The task: who the preference groups are, what each one wants, the requests they send and
//! the reward rules (pure functions of the decoded text).

/// What a group wants from an answer. Every rule is a pure function of the decoded text
/// (special tokens removed) and, for the two name rules, of the group's own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Enthusiasm: the answer contains `!`.
    Exclaims,
    /// A calm answer that asks back: it contains `?` and no `!`.
    CalmQuestion,
    /// Personal: the answer names the user (the group's name as a whole word, any case).
    UsesName,
    /// Brief: the answer has at most [`BRIEF_WORDS`] words.
    Brief,
    /// Structured and anonymous: a line break inside the answer (after trimming), and the
    /// user's name nowhere.
    StructuredAnonymous,
    /// Concrete: the answer contains a digit.
    HasNumber,
}

/// The word limit of [`Want::Brief`].
pub const BRIEF_WORDS: usize = 12;

impl Want {
    /// Short name (tables, CSV).
    pub fn name(self) -> &'static str {
        match self {
            Want::Exclaims => "exclaims",
            Want::CalmQuestion => "calm_question",
            Want::UsesName => "uses_name",
            Want::Brief => "brief",
            Want::StructuredAnonymous => "structured_anonymous",
            Want::HasNumber => "has_number",
        }
    }

    /// The rule in words (printed in the report).
    pub fn rule(self) -> String {
        match self {
            Want::Exclaims => "1 if the text contains `!`".into(),
            Want::CalmQuestion => "1 if it contains `?` and no `!`".into(),
            Want::UsesName => "1 if it contains the user's name as a word".into(),
            Want::Brief => format!("1 if it has ≤ {BRIEF_WORDS} words"),
            Want::StructuredAnonymous => {
                "1 if it has a line break inside (after trimming) and not the user's name".into()
            }
            Want::HasNumber => "1 if it contains a digit".into(),
        }
    }

    /// Whether `text` satisfies the want of a user called `name`.
    pub fn satisfied(self, text: &str, name: &str) -> bool {
        match self {
            Want::Exclaims => exclaims(text),
            Want::CalmQuestion => calm_question(text),
            Want::UsesName => names(text, name),
            Want::Brief => brief(text),
            Want::StructuredAnonymous => structured_anonymous(text, name),
            Want::HasNumber => has_number(text),
        }
    }
}

fn exclaims(text: &str) -> bool {
    text.contains('!')
}

fn calm_question(text: &str) -> bool {
    text.contains('?') && !text.contains('!')
}

fn brief(text: &str) -> bool {
    words(text).len() <= BRIEF_WORDS
}

fn structured_anonymous(text: &str, name: &str) -> bool {
    text.trim().contains('\n') && !names(text, name)
}

fn has_number(text: &str) -> bool {
    text.chars().any(|c| c.is_ascii_digit())
}

/// The words of `text`: maximal runs of letters, digits and apostrophes (`I'm` is one word,
/// `well-known` two).
pub fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// Whether `name` occurs in `text` as a whole word, ignoring case (`Eli` is not in
/// `Elizabeth`; `Eli's` counts).
pub fn names(text: &str, name: &str) -> bool {
    words(text).iter().any(|w| {
        let w = w.trim_end_matches("'s").trim_end_matches("’s");
        w.eq_ignore_ascii_case(name)
    })
}

/// One preference group: its name (in the prompt, and its label for the trainer), its share
/// of the requests and its want.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub name: &'static str,
    pub share: f64,
    pub want: Want,
}

impl Group {
    /// The reward of `text` for this group: 1 if its want is satisfied, else 0.
    pub fn reward(&self, text: &str) -> f32 {
        f32::from(u8::from(self.want.satisfied(text, self.name)))
    }
}

/// Six groups with long-tailed shares (40/25/15/10/6/4 %). Conflicts: `Ava` wants a `!` that
/// `Ben` forbids; `Cleo` wants her name used, `Eli` wants his never used; `Dev` wants at most
/// twelve words, which leaves little room for `Eli`'s line break.
pub const GROUPS: [Group; 6] = [
    Group {
        name: "Ava",
        share: 0.40,
        want: Want::Exclaims,
    },
    Group {
        name: "Ben",
        share: 0.25,
        want: Want::CalmQuestion,
    },
    Group {
        name: "Cleo",
        share: 0.15,
        want: Want::UsesName,
    },
    Group {
        name: "Dev",
        share: 0.10,
        want: Want::Brief,
    },
    Group {
        name: "Eli",
        share: 0.06,
        want: Want::StructuredAnonymous,
    },
    Group {
        name: "Fay",
        share: 0.04,
        want: Want::HasNumber,
    },
];

/// Requests used for training.
pub const TRAIN_REQUESTS: [&str; 8] = [
    "Recommend a book for me.",
    "Suggest something to do this weekend.",
    "What should I cook for dinner?",
    "Give me a tip for sleeping better.",
    "Recommend a movie.",
    "How can I stay focused while studying?",
    "Suggest a hobby I could start.",
    "What is a good gift for a friend?",
];

/// Requests held out for evaluation: never seen in training.
pub const HELDOUT_REQUESTS: [&str; 4] = [
    "Recommend some music for me.",
    "How can I save money?",
    "Suggest a place to travel.",
    "What should I eat for breakfast?",
];

/// The user message of `group` making `request`. The model sees the name, never the label
/// (which is the same string, but goes to the trainer only).
pub fn user_message(group: &Group, request: &str) -> String {
    format!("I am {}. {request}", group.name)
}

/// Index of the group a uniform draw `u ∈ [0, 1)` falls in, by share.
pub fn group_of(u: f64) -> usize {
    let mut acc = 0.0;
    for (i, g) in GROUPS.iter().enumerate() {
        acc += g.share;
        if u < acc {
            return i;
        }
    }
    GROUPS.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> Group {
        *GROUPS.iter().find(|g| g.name == name).unwrap()
    }

    fn r(name: &str, text: &str) -> f32 {
        group(name).reward(text)
    }

    #[test]
    fn shares_sum_to_one_and_go_down_to_five_percent() {
        let sum: f64 = GROUPS.iter().map(|g| g.share).sum();
        assert!((sum - 1.0).abs() < 1e-12, "{sum}");
        assert!(GROUPS.iter().any(|g| g.share <= 0.05));
        assert!(GROUPS.windows(2).all(|w| w[0].share >= w[1].share));
    }

    #[test]
    fn draws_follow_the_shares() {
        assert_eq!(group_of(0.0), 0);
        assert_eq!(group_of(0.399), 0);
        assert_eq!(group_of(0.40), 1);
        assert_eq!(group_of(0.65), 2);
        assert_eq!(group_of(0.959), 4);
        assert_eq!(group_of(0.96), 5);
        assert_eq!(group_of(0.999_999), 5);
    }

    #[test]
    fn exclaims() {
        assert_eq!(r("Ava", "What a great pick!"), 1.0);
        assert_eq!(r("Ava", "Try a mystery novel."), 0.0);
        assert_eq!(r("Ava", ""), 0.0);
    }

    #[test]
    fn calm_question_conflicts_with_exclaims() {
        assert_eq!(r("Ben", "What kind of books do you like?"), 1.0);
        assert_eq!(r("Ben", "Try a mystery novel."), 0.0, "no question");
        // Ava's want ruins Ben's: the same text scores 1 for one and 0 for the other.
        let text = "Wow! What kind of books do you like?";
        assert_eq!(r("Ben", text), 0.0);
        assert_eq!(r("Ava", text), 1.0);
    }

    #[test]
    fn uses_name_is_a_whole_word_in_any_case() {
        assert_eq!(r("Cleo", "Cleo, try a mystery novel."), 1.0);
        assert_eq!(r("Cleo", "Here you go, CLEO."), 1.0);
        assert_eq!(r("Cleo", "Cleo's favourite might be jazz."), 1.0);
        assert_eq!(r("Cleo", "Cleopatra was a queen."), 0.0);
        assert_eq!(r("Cleo", "Try a mystery novel."), 0.0);
        // Another user's name does not count.
        assert_eq!(r("Cleo", "Ava, try a mystery novel."), 0.0);
    }

    #[test]
    fn brief_counts_words() {
        assert_eq!(
            words("I'm sure a well-known book, 3 pages!"),
            ["I'm", "sure", "a", "well", "known", "book", "3", "pages"]
        );
        assert_eq!(r("Dev", "Read Dune."), 1.0);
        let twelve = "one two three four five six seven eight nine ten eleven twelve";
        assert_eq!(words(twelve).len(), BRIEF_WORDS);
        assert_eq!(r("Dev", twelve), 1.0);
        assert_eq!(r("Dev", &format!("{twelve} thirteen")), 0.0);
        assert_eq!(r("Dev", ""), 1.0, "an empty answer is brief");
    }

    #[test]
    fn structured_anonymous_conflicts_with_uses_name() {
        assert_eq!(r("Eli", "Here are ideas:\n1. Read"), 1.0);
        assert_eq!(r("Eli", "Here are ideas: read"), 0.0, "no line break");
        assert_eq!(
            r("Eli", "Here are ideas: read\n"),
            0.0,
            "trailing break only"
        );
        assert_eq!(r("Eli", "\n\nHere are ideas"), 0.0, "leading breaks only");
        // Using the name, which Cleo wants, ruins it for Eli.
        assert_eq!(r("Eli", "Eli, here are ideas:\n1. Read"), 0.0);
        assert_eq!(r("Eli", "Elisa, here are ideas:\n1. Read"), 1.0);
        assert_eq!(r("Cleo", "Cleo, here are ideas:\n1. Read"), 1.0);
    }

    #[test]
    fn has_number() {
        assert_eq!(r("Fay", "Save 10% of your pay."), 1.0);
        assert_eq!(r("Fay", "Save ten percent of your pay."), 0.0);
    }

    #[test]
    fn every_rule_is_met_by_some_text_and_missed_by_another() {
        let texts = [
            "Ava! Great!",
            "What do you like?",
            "Cleo, read Dune.",
            "Dune.",
            "Ideas:\n- read\n- walk around the lake with a friend for an hour",
            "Sleep 8 hours.",
            "A long answer without any of the features the groups look for in a reply today",
        ];
        for g in GROUPS {
            let scores: Vec<f32> = texts.iter().map(|t| g.reward(t)).collect();
            assert!(scores.contains(&1.0), "{}: {scores:?}", g.name);
            assert!(scores.contains(&0.0), "{}: {scores:?}", g.name);
        }
        // No single text satisfies everyone: the wants conflict.
        for t in texts {
            assert!(GROUPS.iter().any(|g| g.reward(t) == 0.0), "{t}");
        }
    }

    #[test]
    fn user_message_names_the_user_and_not_the_want() {
        let m = user_message(&GROUPS[0], TRAIN_REQUESTS[0]);
        assert_eq!(m, "I am Ava. Recommend a book for me.");
        for g in GROUPS {
            let m = user_message(&g, HELDOUT_REQUESTS[1]);
            assert!(!m.contains(g.want.name()));
        }
        for h in HELDOUT_REQUESTS {
            assert!(!TRAIN_REQUESTS.contains(&h));
        }
    }
}
