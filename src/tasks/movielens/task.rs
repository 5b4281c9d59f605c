//! The next-genre task: from a user and their recent ratings, recommend a genre of the next
//! movie they will like.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Gender, MovieLens, AGE_BRACKETS, OCCUPATIONS};
use crate::{Error, GroupKey, Result};

/// Which attribute of `users.dat` defines a user's preference group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// The age bracket (7 groups, `"Under 18"` … `"56+"`). Default: the brackets differ in
    /// size (4% to 35% of ML-1M's users) and in taste, the setting P-GRPO is about.
    #[default]
    Age,
    /// The occupation (up to 21 groups; `/` in a name becomes `-`, e.g. `"academic-educator"`).
    Occupation,
    /// The gender (`"F"`, `"M"`).
    Gender,
}

impl std::str::FromStr for Grouping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "age" => Ok(Grouping::Age),
            "occupation" => Ok(Grouping::Occupation),
            "gender" => Ok(Grouping::Gender),
            _ => Err(Error::InvalidConfig {
                field: "grouping",
                reason: format!("unknown grouping {s:?}; expected age, occupation or gender"),
            }),
        }
    }
}

/// How [`NextGenreTask::new`] builds examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// The preference groups. Default [`Grouping::Age`].
    pub grouping: Grouping,
    /// How many of the user's previous ratings make up the genre profile. Default 10.
    pub history_len: usize,
    /// A rating with at least this many stars counts as liked; only liked movies are targets.
    /// Default 4.
    pub min_stars: u8,
    /// The last fraction of each user's examples (in time) held out for evaluation.
    /// Default 0.2.
    pub test_fraction: f64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            grouping: Grouping::Age,
            history_len: 10,
            min_stars: 4,
            test_fraction: 0.2,
        }
    }
}

/// One prompt of the task: a user at one point in time, and the genres of the movie they rate
/// (and like) next.
#[derive(Debug, Clone, PartialEq)]
pub struct GenreExample {
    /// `UserID`.
    pub user: u32,
    /// The user's preference group, an index into [`NextGenreTask::groups`].
    pub group: usize,
    /// Features, [`NextGenreTask::num_features`] long (see [`NextGenreTask`]).
    pub features: Vec<f32>,
    /// Indices into [`NextGenreTask::genres`] of the next liked movie's genres.
    pub targets: Vec<u32>,
}

/// Next-genre recommendation from MovieLens ratings.
///
/// Each user's ratings are put in time order (ties by movie id). Every rating at position
/// `t ≥ 1` with at least [`TaskConfig::min_stars`] stars makes one example: the **prompt** is
/// the user at time `t`, the **action** is one of the genres, and the **reward** is 1 if the
/// genre is one of the movie's genres and 0 otherwise (a hit). The last
/// [`TaskConfig::test_fraction`] of each user's examples are held out.
///
/// Features (all in `[−1, 1]`): the age bracket one-hot (7), the gender one-hot (2), the
/// occupation one-hot (21), and a genre profile: for each genre, the mean over the user's last
/// [`TaskConfig::history_len`] ratings of `(stars − 3)/2` if the movie has the genre, else 0.
///
/// The preference group of an example is its user's age bracket, occupation or gender
/// ([`Grouping`]).
#[derive(Debug, Clone)]
pub struct NextGenreTask {
    /// The genre vocabulary (actions): every genre of `movies.dat`, sorted.
    pub genres: Vec<String>,
    /// The preference groups that occur, in code order (`"Under 18"` first for ages).
    pub groups: Vec<String>,
    /// Training examples.
    pub train: Vec<GenreExample>,
    /// Held-out examples (later in time than each user's training examples).
    pub test: Vec<GenreExample>,
}

const DEMOGRAPHIC_FEATURES: usize = 7 + 2 + 21;

impl NextGenreTask {
    /// Builds the task from loaded data.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `history_len == 0`, `min_stars` outside 1–5, a
    /// `test_fraction` outside `[0, 1)`, or data that yield no training example.
    pub fn new(data: &MovieLens, cfg: &TaskConfig) -> Result<Self> {
        if cfg.history_len == 0 {
            return Err(Error::InvalidConfig {
                field: "history_len",
                reason: "must be at least 1".into(),
            });
        }
        if !(1..=5).contains(&cfg.min_stars) {
            return Err(Error::InvalidConfig {
                field: "min_stars",
                reason: format!("must be in 1-5, got {}", cfg.min_stars),
            });
        }
        if !(0.0..1.0).contains(&cfg.test_fraction) {
            return Err(Error::InvalidConfig {
                field: "test_fraction",
                reason: format!("must be in [0, 1), got {}", cfg.test_fraction),
            });
        }
        let mut genres: Vec<String> = data
            .movies()
            .iter()
            .flat_map(|m| m.genres.iter().cloned())
            .collect();
        genres.sort();
        genres.dedup();
        let genre_index: BTreeMap<&str, u32> = genres
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i as u32))
            .collect();
        let movie_genres = |id: u32| -> Vec<u32> {
            data.movie(id)
                .map(|m| m.genres.iter().map(|g| genre_index[g.as_str()]).collect())
                .unwrap_or_default()
        };

        // Group of each user, by code so that the group order is the code order.
        let code = |u: &super::User| -> (usize, String) {
            match cfg.grouping {
                Grouping::Age => (u.age_index(), AGE_BRACKETS[u.age_index()].1.to_owned()),
                Grouping::Occupation => (
                    u.occupation as usize,
                    OCCUPATIONS[u.occupation as usize].replace('/', "-"),
                ),
                Grouping::Gender => match u.gender {
                    Gender::Female => (0, "F".to_owned()),
                    Gender::Male => (1, "M".to_owned()),
                },
            }
        };
        let present: BTreeMap<usize, String> = data.users().iter().map(code).collect();
        let groups: Vec<String> = present.values().cloned().collect();
        let group_of_code: BTreeMap<usize, usize> =
            present.keys().enumerate().map(|(i, &c)| (c, i)).collect();

        let mut by_user: BTreeMap<u32, Vec<super::Rating>> = BTreeMap::new();
        for r in data.ratings() {
            by_user.entry(r.user).or_default().push(*r);
        }
        let g = genres.len();
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (user_id, mut ratings) in by_user {
            let Some(user) = data.user(user_id) else {
                continue;
            };
            ratings.sort_by_key(|r| (r.timestamp, r.movie));
            let group = group_of_code[&code(user).0];
            let mut demo = vec![0.0f32; DEMOGRAPHIC_FEATURES];
            demo[user.age_index()] = 1.0;
            demo[7 + usize::from(user.gender == Gender::Male)] = 1.0;
            demo[9 + user.occupation as usize] = 1.0;
            let rated_genres: Vec<Vec<u32>> =
                ratings.iter().map(|r| movie_genres(r.movie)).collect();
            let mut examples = Vec::new();
            for t in 1..ratings.len() {
                if ratings[t].stars < cfg.min_stars {
                    continue;
                }
                let start = t.saturating_sub(cfg.history_len);
                let mut features = demo.clone();
                features.resize(DEMOGRAPHIC_FEATURES + g, 0.0);
                let window = (t - start) as f32;
                for (r, gs) in ratings[start..t].iter().zip(&rated_genres[start..t]) {
                    let liking = (r.stars as f32 - 3.0) / 2.0;
                    for &k in gs {
                        features[DEMOGRAPHIC_FEATURES + k as usize] += liking / window;
                    }
                }
                examples.push(GenreExample {
                    user: user_id,
                    group,
                    features,
                    targets: rated_genres[t].clone(),
                });
            }
            let n_test = (examples.len() as f64 * cfg.test_fraction).round() as usize;
            let split = examples.len() - n_test;
            test.extend(examples.drain(split..));
            train.extend(examples);
        }
        if train.is_empty() {
            return Err(Error::InvalidConfig {
                field: "movielens",
                reason: format!(
                    "no training example: no user has a rating with at least {} stars after \
                     their first rating",
                    cfg.min_stars
                ),
            });
        }
        Ok(Self {
            genres,
            groups,
            train,
            test,
        })
    }

    /// Feature width: 30 demographic features plus one per genre.
    pub fn num_features(&self) -> usize {
        DEMOGRAPHIC_FEATURES + self.genres.len()
    }

    /// Number of actions: one per genre.
    pub fn num_actions(&self) -> usize {
        self.genres.len()
    }

    /// The [`GroupKey`] of group `g` (its name).
    pub fn group_key(&self, g: usize) -> GroupKey {
        GroupKey::Name(self.groups[g].clone())
    }

    /// The reward of recommending genre `action` for `example`: 1 for a hit, else 0.
    pub fn reward(example: &GenreExample, action: u32) -> f32 {
        if example.targets.contains(&action) {
            1.0
        } else {
            0.0
        }
    }

    /// Number of examples per group in `examples`.
    pub fn group_counts(&self, examples: &[GenreExample]) -> Vec<usize> {
        let mut n = vec![0; self.groups.len()];
        for e in examples {
            n[e.group] += 1;
        }
        n
    }

    /// Expected hit rate per group: the mean over `examples` of each group of
    /// `Σ_{a ∈ targets} π(a | x)`, with `probs[i]` the policy's action probabilities for
    /// `examples[i]`. `NaN` for a group without examples.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `probs` and `examples` differ in length.
    pub fn hit_rates(&self, examples: &[GenreExample], probs: &[Vec<f32>]) -> Result<Vec<f64>> {
        if probs.len() != examples.len() {
            return Err(Error::LengthMismatch {
                what: "probs",
                got: probs.len(),
                against: "examples",
                expected: examples.len(),
            });
        }
        let mut sum = vec![0.0f64; self.groups.len()];
        let mut n = vec![0usize; self.groups.len()];
        for (e, p) in examples.iter().zip(probs) {
            sum[e.group] += e
                .targets
                .iter()
                .map(|&a| p.get(a as usize).copied().unwrap_or(0.0) as f64)
                .sum::<f64>();
            n[e.group] += 1;
        }
        Ok(sum
            .iter()
            .zip(&n)
            .map(|(s, &c)| if c == 0 { f64::NAN } else { s / c as f64 })
            .collect())
    }

    /// A non-learned reference: per group, the hit rate on the test examples of always
    /// recommending the genre that is most often a target among the group's training
    /// examples.
    pub fn majority_genre_baseline(&self) -> Vec<f64> {
        let k = self.groups.len();
        let mut counts = vec![vec![0usize; self.genres.len()]; k];
        for e in &self.train {
            for &a in &e.targets {
                counts[e.group][a as usize] += 1;
            }
        }
        let best: Vec<u32> = counts
            .iter()
            .map(|c| {
                c.iter()
                    .enumerate()
                    .max_by_key(|(i, &n)| (n, std::cmp::Reverse(*i)))
                    .map_or(0, |(i, _)| i as u32)
            })
            .collect();
        let mut hits = vec![0.0f64; k];
        let mut n = vec![0usize; k];
        for e in &self.test {
            hits[e.group] += f64::from(Self::reward(e, best[e.group]));
            n[e.group] += 1;
        }
        hits.iter()
            .zip(&n)
            .map(|(h, &c)| if c == 0 { f64::NAN } else { h / c as f64 })
            .collect()
    }
}
