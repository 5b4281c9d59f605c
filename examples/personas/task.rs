//! The persona task: who the personas are, what each one rewards, the prompt each one sends,
//! and the word-level vocabulary of the from-scratch model.

use pgrpo::lm::{chatml, Tokenizer};

/// A writing style and the proxy that measures it on the decoded text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Casual,
    Formal,
    Enthusiastic,
    Technical,
    Poetic,
    Terse,
    Humorous,
}

impl Style {
    pub fn name(self) -> &'static str {
        match self {
            Style::Casual => "casual",
            Style::Formal => "formal",
            Style::Enthusiastic => "enthusiastic",
            Style::Technical => "technical",
            Style::Poetic => "poetic",
            Style::Terse => "terse",
            Style::Humorous => "humorous",
        }
    }

    /// The marker words of a word-list style.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Style::Casual => &CASUAL,
            Style::Formal => &FORMAL,
            Style::Technical => &TECHNICAL,
            Style::Poetic => &POETIC,
            Style::Humorous => &HUMOROUS,
            Style::Enthusiastic | Style::Terse => &[],
        }
    }

    /// The rule, in words (printed by the example).
    pub fn rule(self) -> String {
        match self {
            Style::Enthusiastic => "min(#'!', 3) / 3".into(),
            Style::Terse => "clamp((10 − #words) / 7, 0, 1): 1 at ≤ 3 words, 0 at ≥ 10".into(),
            Style::Formal => format!(
                "min(#distinct of {{{}}}, 2) / 2, but 0 if any '!'",
                self.markers().join(", ")
            ),
            _ => format!("min(#distinct of {{{}}}, 2) / 2", self.markers().join(", ")),
        }
    }
}

/// One persona: a name (its hint in the prompt and its preference-group label), how often it
/// asks, its writing style and its music genre.
#[derive(Debug, Clone, Copy)]
pub struct Persona {
    pub name: &'static str,
    pub frequency: f64,
    pub style: Style,
    pub genre: &'static str,
}

/// Seven personas with a long-tailed frequency (40/20/12/10/8/6/4 %).
pub const PERSONAS: [Persona; 7] = [
    Persona {
        name: "ava",
        frequency: 0.40,
        style: Style::Casual,
        genre: "rock",
    },
    Persona {
        name: "ben",
        frequency: 0.20,
        style: Style::Formal,
        genre: "classical",
    },
    Persona {
        name: "cleo",
        frequency: 0.12,
        style: Style::Enthusiastic,
        genre: "pop",
    },
    Persona {
        name: "dev",
        frequency: 0.10,
        style: Style::Technical,
        genre: "electronic",
    },
    Persona {
        name: "eli",
        frequency: 0.08,
        style: Style::Poetic,
        genre: "jazz",
    },
    Persona {
        name: "fay",
        frequency: 0.06,
        style: Style::Terse,
        genre: "folk",
    },
    Persona {
        name: "gus",
        frequency: 0.04,
        style: Style::Humorous,
        genre: "hiphop",
    },
];

/// Every genre the reward recognises: the seven preferred ones and four that nobody prefers.
pub const GENRES: [&str; 11] = [
    "rock",
    "classical",
    "pop",
    "electronic",
    "jazz",
    "folk",
    "hiphop",
    "metal",
    "blues",
    "country",
    "reggae",
];
const CASUAL: [&str; 5] = ["hey", "yeah", "cool", "gonna", "dude"];
const FORMAL: [&str; 5] = ["certainly", "indeed", "kindly", "regards", "sincerely"];
const TECHNICAL: [&str; 5] = ["tempo", "bpm", "chord", "harmonic", "timbre"];
const POETIC: [&str; 5] = ["moon", "dream", "whisper", "soul", "starlight"];
const HUMOROUS: [&str; 5] = ["haha", "lol", "joke", "funny", "silly"];
/// Neutral words of the from-scratch vocabulary (and the words of the prompt).
const FILLER: [&str; 45] = [
    "user",
    "assistant",
    "i",
    "am",
    "recommend",
    "some",
    "music",
    "for",
    "me",
    "you",
    "try",
    "listen",
    "to",
    "this",
    "that",
    "great",
    "album",
    "song",
    "songs",
    "artist",
    "band",
    "playlist",
    "enjoy",
    "the",
    "a",
    "and",
    "with",
    "my",
    "your",
    "favorite",
    "new",
    "old",
    "check",
    "out",
    "here",
    "is",
    "it",
    "of",
    "really",
    "good",
    "maybe",
    "like",
    "night",
    "day",
    "or",
];
const PUNCTUATION: [&str; 4] = [".", ",", "!", "?"];

/// The reward's two parts for one completion, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub genre: f32,
    pub style: f32,
}

impl Score {
    /// `R = 0.5 · genre + 0.5 · style`.
    pub fn total(self) -> f32 {
        0.5 * self.genre + 0.5 * self.style
    }
}

/// Scores a decoded completion for a persona (see the example's doc comment for the rules).
///
/// The text is lower-cased, `hip-hop`/`hip hop` become `hiphop`, and words are the maximal
/// runs of alphanumeric characters; `'!'` is counted on the text.
pub fn score(persona: &Persona, text: &str) -> Score {
    let lower = text
        .to_lowercase()
        .replace("hip-hop", "hiphop")
        .replace("hip hop", "hiphop");
    let bangs = lower.matches('!').count();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let named = GENRES.iter().filter(|g| words.contains(g)).count();
    let genre = if words.contains(&persona.genre) {
        1.0 / named as f32
    } else {
        0.0
    };
    let distinct = |list: &[&str]| list.iter().filter(|m| words.contains(m)).count();
    let capped = |k: usize| k.min(2) as f32 / 2.0;
    let style = match persona.style {
        Style::Enthusiastic => bangs.min(3) as f32 / 3.0,
        Style::Terse => ((10.0 - words.len() as f32) / 7.0).clamp(0.0, 1.0),
        Style::Formal if bangs > 0 => 0.0,
        s => capped(distinct(s.markers())),
    };
    Score { genre, style }
}

/// Whether the prompt names the persona.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hint {
    /// "I am Ava. Recommend some music for me. …" — the policy sees who is asking.
    Name,
    /// "Recommend some music for me. …" for everyone — the policy cannot tell personas apart.
    None,
}

/// The request every persona makes.
const REQUEST: &str = "Recommend some music for me.";
/// Appended with `list_genres`: SmolLM2-135M names a genre far more often when the request
/// lists them (without the list it mostly writes about music without naming one).
const GENRE_LIST: &str = " Rock, pop, jazz, classical, folk, hiphop or electronic?";

/// The user message of a persona.
pub fn user_message(persona: &Persona, hint: Hint, list_genres: bool) -> String {
    let mut msg = match hint {
        Hint::Name => {
            let mut name = persona.name.to_owned();
            name[..1].make_ascii_uppercase();
            format!("I am {name}. {REQUEST}")
        }
        Hint::None => REQUEST.to_owned(),
    };
    if list_genres {
        msg.push_str(GENRE_LIST);
    }
    msg
}

/// The one-turn ChatML prompt of a persona.
pub fn prompt_text(persona: &Persona, hint: Hint, list_genres: bool) -> String {
    chatml(None, &user_message(persona, hint, list_genres))
}

/// Special tokens of the from-scratch vocabulary: ids 0, 1, 2 (as in SmolLM2).
pub const UNK: &str = "<unk>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// The words of the from-scratch vocabulary after the three special tokens, without
/// duplicates, in a fixed order.
pub fn vocabulary() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    let lists: [&[&'static str]; 8] = [
        &FILLER,
        &PUNCTUATION,
        &GENRES,
        &CASUAL,
        &FORMAL,
        &TECHNICAL,
        &POETIC,
        &HUMOROUS,
    ];
    let names: Vec<&'static str> = PERSONAS.iter().map(|p| p.name).collect();
    for w in lists.iter().flat_map(|l| l.iter()).chain(names.iter()) {
        if !out.contains(w) {
            out.push(w);
        }
    }
    out
}

/// A word-level tokenizer built with the `tokenizers` crate: lower-casing, split on
/// whitespace and around each punctuation character, one id per word of [`vocabulary`];
/// `<unk>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2 (the end of a turn, the stop token).
/// Decoding joins words with spaces.
pub fn word_tokenizer() -> pgrpo::Result<Tokenizer> {
    let specials = [UNK, IM_START, IM_END];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .copied()
        .chain(vocabulary())
        .enumerate()
        .map(|(i, w)| (w.to_owned(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({
                "id": i, "content": w, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Punctuation", "behavior": "Isolated"}
        ]},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| pgrpo::Error::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persona(name: &str) -> Persona {
        *PERSONAS.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn rules() {
        let s = score(&persona("ava"), "hey dude , rock and jazz");
        assert_eq!((s.genre, s.style), (0.5, 1.0));
        let s = score(&persona("ben"), "certainly classical !");
        assert_eq!((s.genre, s.style), (1.0, 0.0));
        let s = score(&persona("cleo"), "pop ! ! ! !");
        assert_eq!((s.genre, s.style), (1.0, 1.0));
        let s = score(&persona("fay"), "folk .");
        assert_eq!(s.total(), 1.0);
        let s = score(&persona("gus"), "Try some Hip-Hop, lol!");
        assert_eq!((s.genre, s.style), (1.0, 0.5));
    }
}
