//! A synthetic sample in exactly the MovieLens-1M file format, for tests and for running the
//! example without the real data.
//!
//! The sample has structure, so that preference groups differ in what they like:
//!
//! - users get an age bracket with roughly ML-1M's proportions (25-34 is the largest bracket
//!   at 35%, under-18s the smallest at 4%), a gender (72% `M`) and an occupation that
//!   depends on age (most under-18s are K-12 students, most 56+ users retired);
//! - each age bracket likes four genres ([`BRACKET_GENRES`]); a user's taste for a genre is
//!   +1 if their bracket likes it and −0.3 otherwise, plus personal noise `N(0, 0.3²)`;
//! - each movie has one to three genres (the first drawn with ML-1M-like popularity: Drama and
//!   Comedy most often) and a quality `N(0, 0.5²)`;
//! - a user rates 20–60 movies, picked without replacement with weight
//!   `exp(1.5 · affinity)`, where affinity is the mean taste over the movie's genres plus its
//!   quality; stars are `round(3 + 1.5 · affinity + N(0, 0.6²))` clipped to 1–5;
//! - timestamps start in April 2000 (as ML-1M's do) and increase per user, but each user's
//!   lines are written in shuffled order, as in the real `ratings.dat`.
//!
//! About one title in 25 has non-ASCII Latin-1 letters (`Misérables`, `Señor`) and
//! `movies.dat` is written in ISO-8859-1, like the original, so the loader's decoding is
//! exercised. Everything is drawn from one seeded generator: a seed fixes the files.

use std::fs;
use std::path::Path;

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::{Gender, GENRES};
use crate::{Error, Result};

/// The genres (indices into [`GENRES`]) each age bracket (index into
/// [`AGE_BRACKETS`](super::AGE_BRACKETS)) likes in the sample.
pub const BRACKET_GENRES: [[usize; 4]; 7] = [
    [2, 3, 4, 8],    // Under 18: Animation, Children's, Comedy, Fantasy
    [0, 14, 10, 15], // 18-24: Action, Sci-Fi, Horror, Thriller
    [4, 13, 7, 1],   // 25-34: Comedy, Romance, Drama, Adventure
    [7, 15, 5, 12],  // 35-44: Drama, Thriller, Crime, Mystery
    [7, 16, 12, 6],  // 45-49: Drama, War, Mystery, Documentary
    [16, 17, 7, 9],  // 50-55: War, Western, Drama, Film-Noir
    [9, 11, 17, 6],  // 56+: Film-Noir, Musical, Western, Documentary
];

/// Share of users per age bracket (ML-1M's, rounded).
const BRACKET_SHARE: [f64; 7] = [0.04, 0.18, 0.35, 0.20, 0.09, 0.08, 0.06];

/// Relative frequency of each genre as a movie's first genre (ML-1M-like).
const GENRE_POPULARITY: [f64; 18] = [
    5.0, 3.0, 1.0, 2.0, 12.0, 2.0, 1.0, 15.0, 1.0, 0.5, 3.0, 1.0, 1.0, 4.0, 2.0, 5.0, 1.5, 0.7,
];

const ADJECTIVES: [&str; 16] = [
    "Silent", "Broken", "Golden", "Last", "Crimson", "Hidden", "Wild", "Lonely", "Electric",
    "Frozen", "Restless", "Secret", "Burning", "Distant", "Lucky", "Midnight",
];
const NOUNS: [&str; 16] = [
    "River", "Empire", "Summer", "Garden", "Stranger", "Harbor", "Mirror", "Frontier", "Letter",
    "Kingdom", "Promise", "Horizon", "Circus", "Canyon", "Orchard", "Signal",
];
const LATIN1_TITLES: [&str; 6] = [
    "Les Misérables",
    "Señor Niño",
    "Amélie à Paris",
    "Götterdämmerung",
    "Crème Brûlée",
    "Ça Ira",
];

/// Size and seed of a synthetic sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleConfig {
    /// Number of users. Default 600.
    pub users: usize,
    /// Number of movies. Default 240.
    pub movies: usize,
    /// Fewest ratings per user (ML-1M keeps users with at least 20). Default 20.
    pub min_ratings: usize,
    /// Most ratings per user (at most `movies`). Default 60.
    pub max_ratings: usize,
    /// Seed of the generator. Default 0.
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            users: 600,
            movies: 240,
            min_ratings: 20,
            max_ratings: 60,
            seed: 0,
        }
    }
}

/// A draw from `N(0, sd²)`.
fn gauss(rng: &mut StdRng, sd: f64) -> f64 {
    let z: f64 = StandardNormal.sample(rng);
    sd * z
}

fn draw_index(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// `s` in ISO-8859-1 (every character of the sample is below U+0100).
fn latin1(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(c as u32).unwrap_or(b'?'))
        .collect()
}

/// Writes `users.dat`, `movies.dat` and `ratings.dat` of a synthetic sample into `dir`
/// (created if missing; existing files are replaced). See the [module docs](self).
///
/// # Errors
/// [`Error::InvalidConfig`] for zero users or movies, or `min_ratings > max_ratings` or
/// `max_ratings > movies`; [`Error::File`] if a file cannot be written.
pub fn write_sample(dir: impl AsRef<Path>, cfg: &SampleConfig) -> Result<()> {
    let dir = dir.as_ref();
    if cfg.users == 0 || cfg.movies == 0 {
        return Err(Error::InvalidConfig {
            field: "users",
            reason: "the sample needs at least one user and one movie".into(),
        });
    }
    if cfg.min_ratings == 0 || cfg.min_ratings > cfg.max_ratings || cfg.max_ratings > cfg.movies {
        return Err(Error::InvalidConfig {
            field: "max_ratings",
            reason: format!(
                "need 1 <= min_ratings <= max_ratings <= movies, got {} <= {} <= {}",
                cfg.min_ratings, cfg.max_ratings, cfg.movies
            ),
        });
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    // Movies: genres and quality.
    let mut movies = Vec::with_capacity(cfg.movies);
    let mut movies_dat = Vec::new();
    for id in 1..=cfg.movies as u32 {
        let first = draw_index(&GENRE_POPULARITY, &mut rng);
        let mut genres = vec![first];
        for _ in 0..rng.random_range(0..3) {
            let g = rng.random_range(0..GENRES.len());
            if !genres.contains(&g) {
                genres.push(g);
            }
        }
        genres.sort_unstable();
        let quality: f64 = gauss(&mut rng, 0.5);
        let year = rng.random_range(1930..=2000);
        let title = if id % 25 == 7 {
            LATIN1_TITLES[(id as usize / 25) % LATIN1_TITLES.len()].to_owned()
        } else {
            format!(
                "{} {}",
                ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                NOUNS[rng.random_range(0..NOUNS.len())]
            )
        };
        let names: Vec<&str> = genres.iter().map(|&g| GENRES[g]).collect();
        movies_dat.extend(latin1(&format!(
            "{id}::{title} ({year})::{}\n",
            names.join("|")
        )));
        movies.push((genres, quality));
    }

    let mut users_dat = String::new();
    let mut ratings_dat = String::new();
    for id in 1..=cfg.users as u32 {
        let bracket = draw_index(&BRACKET_SHARE, &mut rng);
        let age = super::AGE_BRACKETS[bracket].0;
        let gender = if rng.random::<f64>() < 0.72 {
            Gender::Male
        } else {
            Gender::Female
        };
        let typical = match bracket {
            0 => Some(10), // K-12 student
            1 => Some(4),  // college/grad student
            6 => Some(13), // retired
            _ => None,
        };
        let occupation = match typical {
            Some(o) if rng.random::<f64>() < 0.6 => o,
            _ => rng.random_range(0..21u8),
        };
        let zip = rng.random_range(10_000..100_000u32);
        users_dat.push_str(&format!(
            "{id}::{}::{age}::{occupation}::{zip}\n",
            if gender == Gender::Male { "M" } else { "F" }
        ));

        let taste: Vec<f64> = (0..GENRES.len())
            .map(|g| {
                let base = if BRACKET_GENRES[bracket].contains(&g) {
                    1.0
                } else {
                    -0.3
                };
                base + gauss(&mut rng, 0.3)
            })
            .collect();
        let affinity: Vec<f64> = movies
            .iter()
            .map(|(genres, q)| {
                genres.iter().map(|&g| taste[g]).sum::<f64>() / genres.len() as f64 + q
            })
            .collect();
        let mut weights: Vec<f64> = affinity.iter().map(|a| (1.5 * a).exp()).collect();
        let n = rng.random_range(cfg.min_ratings..=cfg.max_ratings);
        let mut t = 956_703_932 + rng.random_range(0..30_000_000i64);
        let mut lines = Vec::with_capacity(n);
        for _ in 0..n {
            let m = draw_index(&weights, &mut rng);
            weights[m] = 0.0;
            let stars = (3.0 + 1.5 * affinity[m] + gauss(&mut rng, 0.6))
                .round()
                .clamp(1.0, 5.0) as u8;
            t += rng.random_range(10..86_400);
            lines.push(format!("{id}::{}::{stars}::{t}\n", m + 1));
        }
        lines.shuffle(&mut rng);
        lines.iter().for_each(|l| ratings_dat.push_str(l));
    }

    fs::create_dir_all(dir).map_err(|e| Error::File {
        path: dir.to_owned(),
        reason: format!("cannot create: {e}"),
    })?;
    for (name, bytes) in [
        ("users.dat", users_dat.as_bytes()),
        ("movies.dat", movies_dat.as_slice()),
        ("ratings.dat", ratings_dat.as_bytes()),
    ] {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(|e| Error::File {
            path,
            reason: format!("cannot write: {e}"),
        })?;
    }
    Ok(())
}
