//! The MovieLens-1M data set: a loader for its file format, a synthetic sample in the same
//! format, and a next-genre recommendation task with preference groups from the users' data.
//!
//! # The format
//!
//! MovieLens-1M (GroupLens, 2003: 1,000,209 ratings of 3,706 movies by 6,040 users) is three
//! text files in one folder. Fields are separated by `::`; the files are ISO-8859-1
//! (Latin-1), which matters for titles such as `Misérables`:
//!
//! | file | line | fields |
//! |---|---|---|
//! | `ratings.dat` | `1::1193::5::978300760` | `UserID::MovieID::Rating::Timestamp` — whole stars 1–5, seconds since the Unix epoch |
//! | `movies.dat` | `1::Toy Story (1995)::Animation\|Children's\|Comedy` | `MovieID::Title::Genres` — genres `\|`-separated |
//! | `users.dat` | `1::F::1::10::48067` | `UserID::Gender::Age::Occupation::Zip-code` — gender `M`/`F`, age a bracket code ([`AGE_BRACKETS`]), occupation 0–20 ([`OCCUPATIONS`]) |
//!
//! [`MovieLens::load`] reads a folder with the three files. Each line is decoded as UTF-8 if
//! it is valid UTF-8 and as Latin-1 otherwise, so both the original files and re-encoded
//! copies load. Blank lines are skipped. Anything else that does not fit the format is an
//! [`Error::Parse`] naming the file and the 1-based line: a wrong number of fields, a
//! non-numeric id, a rating outside 1–5, an unknown age code or occupation, a duplicate id,
//! or a rating by a user (of a movie) that the other files do not list.
//!
//! ```
//! use pgrpo::tasks::movielens::{synthetic, MovieLens};
//! let dir = std::env::temp_dir().join(format!("pgrpo-doc-ml-{}", std::process::id()));
//! synthetic::write_sample(&dir, &synthetic::SampleConfig::default())?;
//! let data = MovieLens::load(&dir)?;
//! assert_eq!(data.users().len(), 600);
//! let first = &data.ratings()[0];
//! assert!((1..=5).contains(&first.stars));
//! let user = data.user(first.user).unwrap();
//! println!("user {} is {}", user.id, user.age_bracket());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), pgrpo::Error>(())
//! ```
//!
//! The real data set is not redistributed with this crate (its licence forbids it); download
//! `ml-1m.zip` from GroupLens, unzip it, and pass the `ml-1m` folder to [`MovieLens::load`] —
//! or to `cargo run --release --example movielens -- --data ml-1m`.

pub mod synthetic;
mod task;

pub use task::{GenreExample, Grouping, NextGenreTask, TaskConfig};

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::{Error, Result};

/// The age codes of `users.dat` and the brackets they stand for.
pub const AGE_BRACKETS: [(u8, &str); 7] = [
    (1, "Under 18"),
    (18, "18-24"),
    (25, "25-34"),
    (35, "35-44"),
    (45, "45-49"),
    (50, "50-55"),
    (56, "56+"),
];

/// The occupations of `users.dat`, indexed by their code 0–20.
pub const OCCUPATIONS: [&str; 21] = [
    "other or not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
];

/// The 18 genres of MovieLens-1M, in the order of its README.
pub const GENRES: [&str; 18] = [
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// One line of `ratings.dat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rating {
    /// `UserID`.
    pub user: u32,
    /// `MovieID`.
    pub movie: u32,
    /// `Rating`: whole stars, 1–5.
    pub stars: u8,
    /// `Timestamp`: seconds since the Unix epoch.
    pub timestamp: i64,
}

/// One line of `movies.dat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movie {
    /// `MovieID`.
    pub id: u32,
    /// `Title`, with the year in parentheses as in the file.
    pub title: String,
    /// `Genres`, split at `|`.
    pub genres: Vec<String>,
}

/// `M` or `F` in `users.dat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gender {
    /// `F`.
    Female,
    /// `M`.
    Male,
}

/// One line of `users.dat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `UserID`.
    pub id: u32,
    /// `Gender`.
    pub gender: Gender,
    /// `Age`: one of the codes of [`AGE_BRACKETS`] (1, 18, 25, 35, 45, 50, 56).
    pub age: u8,
    /// `Occupation`: an index into [`OCCUPATIONS`].
    pub occupation: u8,
    /// `Zip-code`, as written.
    pub zip: String,
}

impl User {
    /// The bracket of the age code, e.g. `"25-34"`.
    pub fn age_bracket(&self) -> &'static str {
        AGE_BRACKETS
            .iter()
            .find(|(c, _)| *c == self.age)
            .map_or("unknown", |(_, s)| s)
    }

    /// The position of the age code in [`AGE_BRACKETS`] (0–6).
    pub fn age_index(&self) -> usize {
        AGE_BRACKETS
            .iter()
            .position(|(c, _)| *c == self.age)
            .unwrap_or(0)
    }

    /// The occupation's name, e.g. `"programmer"`.
    pub fn occupation_name(&self) -> &'static str {
        OCCUPATIONS
            .get(self.occupation as usize)
            .copied()
            .unwrap_or("unknown")
    }
}

/// A loaded MovieLens-1M folder: users, movies and ratings, in file order.
#[derive(Debug, Clone)]
pub struct MovieLens {
    users: Vec<User>,
    movies: Vec<Movie>,
    ratings: Vec<Rating>,
    user_index: HashMap<u32, usize>,
    movie_index: HashMap<u32, usize>,
}

impl MovieLens {
    /// Loads `users.dat`, `movies.dat` and `ratings.dat` from `dir` and checks that every
    /// rating refers to a listed user and movie.
    ///
    /// # Errors
    /// [`Error::File`] if a file cannot be read, [`Error::Parse`] naming the file and line of
    /// the first malformed line.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let users = parse_users(&dir.join("users.dat"), &read(&dir.join("users.dat"))?)?;
        let movies = parse_movies(&dir.join("movies.dat"), &read(&dir.join("movies.dat"))?)?;
        let path = dir.join("ratings.dat");
        let ratings = parse_ratings(&path, &read(&path)?)?;
        let data = Self::from_parts(users, movies, Vec::new())?;
        // Check references with line numbers (from_parts would only know the index).
        for r in &ratings {
            let line = r.line;
            if !data.user_index.contains_key(&r.rating.user) {
                return Err(parse_error(
                    &path,
                    line,
                    format!("user {} is not in users.dat", r.rating.user),
                ));
            }
            if !data.movie_index.contains_key(&r.rating.movie) {
                return Err(parse_error(
                    &path,
                    line,
                    format!("movie {} is not in movies.dat", r.rating.movie),
                ));
            }
        }
        let ratings = ratings.into_iter().map(|r| r.rating).collect();
        let data = Self { ratings, ..data };
        tracing::debug!(
            users = data.users.len(),
            movies = data.movies.len(),
            ratings = data.ratings.len(),
            dir = %dir.display(),
            "loaded MovieLens"
        );
        Ok(data)
    }

    /// A data set from parsed records.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a duplicate user or movie id, or a rating of an unknown
    /// user or movie.
    pub fn from_parts(users: Vec<User>, movies: Vec<Movie>, ratings: Vec<Rating>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidConfig {
            field: "movielens",
            reason,
        };
        let mut user_index = HashMap::with_capacity(users.len());
        for (i, u) in users.iter().enumerate() {
            if user_index.insert(u.id, i).is_some() {
                return Err(invalid(format!("user {} is listed twice", u.id)));
            }
        }
        let mut movie_index = HashMap::with_capacity(movies.len());
        for (i, m) in movies.iter().enumerate() {
            if movie_index.insert(m.id, i).is_some() {
                return Err(invalid(format!("movie {} is listed twice", m.id)));
            }
        }
        for r in &ratings {
            if !user_index.contains_key(&r.user) {
                return Err(invalid(format!("a rating names unknown user {}", r.user)));
            }
            if !movie_index.contains_key(&r.movie) {
                return Err(invalid(format!("a rating names unknown movie {}", r.movie)));
            }
        }
        Ok(Self {
            users,
            movies,
            ratings,
            user_index,
            movie_index,
        })
    }

    /// Every user, in file order.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// Every movie, in file order.
    pub fn movies(&self) -> &[Movie] {
        &self.movies
    }

    /// Every rating, in file order.
    pub fn ratings(&self) -> &[Rating] {
        &self.ratings
    }

    /// The user with this id.
    pub fn user(&self, id: u32) -> Option<&User> {
        self.user_index.get(&id).map(|&i| &self.users[i])
    }

    /// The movie with this id.
    pub fn movie(&self, id: u32) -> Option<&Movie> {
        self.movie_index.get(&id).map(|&i| &self.movies[i])
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::File {
        path: path.to_owned(),
        reason: format!("cannot read: {e}"),
    })
}

fn parse_error(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Parse {
        path: path.to_owned(),
        line,
        reason: reason.into(),
    }
}

/// The lines of a file as `(1-based line number, text)`, each decoded as UTF-8 when valid and
/// as ISO-8859-1 otherwise; `\r\n` endings and blank lines are dropped.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Cow<'_, str>)> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(n, l)| {
            let text = match std::str::from_utf8(l) {
                Ok(s) => Cow::Borrowed(s),
                // ISO-8859-1 maps each byte to the code point of the same value.
                Err(_) => Cow::Owned(l.iter().map(|&b| b as char).collect()),
            };
            (n, text)
        })
}

/// Splits a line into exactly `N` `::`-separated fields.
fn fields<'a, const N: usize>(
    path: &Path,
    line: usize,
    text: &'a str,
    layout: &str,
) -> Result<[&'a str; N]> {
    let parts: Vec<&str> = text.split("::").collect();
    <[&str; N]>::try_from(parts.as_slice()).map_err(|_| {
        parse_error(
            path,
            line,
            format!(
                "expected {N} `::`-separated fields ({layout}), found {}",
                parts.len()
            ),
        )
    })
}

fn number<T: std::str::FromStr>(path: &Path, line: usize, what: &str, s: &str) -> Result<T> {
    s.trim()
        .parse()
        .map_err(|_| parse_error(path, line, format!("{what} {s:?} is not a valid number")))
}

/// A rating with the line it came from.
struct LinedRating {
    rating: Rating,
    line: usize,
}

/// Parses the bytes of a `ratings.dat` (`path` is only used in errors).
fn parse_ratings(path: &Path, bytes: &[u8]) -> Result<Vec<LinedRating>> {
    let mut out = Vec::with_capacity(bytes.len() / 24);
    for (line, text) in lines(bytes) {
        let [u, m, r, t] = fields::<4>(path, line, &text, "UserID::MovieID::Rating::Timestamp")?;
        let stars: u8 = number(path, line, "Rating", r)?;
        if !(1..=5).contains(&stars) {
            return Err(parse_error(
                path,
                line,
                format!("Rating {stars} is outside 1-5"),
            ));
        }
        out.push(LinedRating {
            rating: Rating {
                user: number(path, line, "UserID", u)?,
                movie: number(path, line, "MovieID", m)?,
                stars,
                timestamp: number(path, line, "Timestamp", t)?,
            },
            line,
        });
    }
    Ok(out)
}

/// Parses the bytes of a `movies.dat`. The title is everything between the first and the last
/// `::`, so a title that itself contains `::` still loads.
fn parse_movies(path: &Path, bytes: &[u8]) -> Result<Vec<Movie>> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (line, text) in lines(bytes) {
        let (Some((id, rest)), Some((_, genres))) = (text.split_once("::"), text.rsplit_once("::"))
        else {
            return Err(parse_error(
                path,
                line,
                "expected 3 `::`-separated fields (MovieID::Title::Genres), found 1",
            ));
        };
        let Some((title, _)) = rest.rsplit_once("::") else {
            return Err(parse_error(
                path,
                line,
                "expected 3 `::`-separated fields (MovieID::Title::Genres), found 2",
            ));
        };
        let id: u32 = number(path, line, "MovieID", id)?;
        if let Some(first) = seen.insert(id, line) {
            return Err(parse_error(
                path,
                line,
                format!("MovieID {id} was already listed on line {first}"),
            ));
        }
        if title.trim().is_empty() {
            return Err(parse_error(path, line, "the title is empty"));
        }
        let genres: Vec<String> = genres
            .split('|')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        if genres.is_empty() {
            return Err(parse_error(path, line, "the movie has no genre"));
        }
        out.push(Movie {
            id,
            title: title.to_owned(),
            genres,
        });
    }
    Ok(out)
}

/// Parses the bytes of a `users.dat`.
fn parse_users(path: &Path, bytes: &[u8]) -> Result<Vec<User>> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (line, text) in lines(bytes) {
        let [id, gender, age, occupation, zip] = fields::<5>(
            path,
            line,
            &text,
            "UserID::Gender::Age::Occupation::Zip-code",
        )?;
        let id: u32 = number(path, line, "UserID", id)?;
        if let Some(first) = seen.insert(id, line) {
            return Err(parse_error(
                path,
                line,
                format!("UserID {id} was already listed on line {first}"),
            ));
        }
        let gender = match gender.trim() {
            "F" => Gender::Female,
            "M" => Gender::Male,
            g => {
                return Err(parse_error(
                    path,
                    line,
                    format!("Gender {g:?} is neither M nor F"),
                ))
            }
        };
        let age: u8 = number(path, line, "Age", age)?;
        if !AGE_BRACKETS.iter().any(|(c, _)| *c == age) {
            return Err(parse_error(
                path,
                line,
                format!("Age {age} is not one of the codes 1, 18, 25, 35, 45, 50, 56"),
            ));
        }
        let occupation: u8 = number(path, line, "Occupation", occupation)?;
        if occupation as usize >= OCCUPATIONS.len() {
            return Err(parse_error(
                path,
                line,
                format!("Occupation {occupation} is outside 0-20"),
            ));
        }
        out.push(User {
            id,
            gender,
            age,
            occupation,
            zip: zip.trim().to_owned(),
        });
    }
    Ok(out)
}
