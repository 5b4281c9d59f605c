//! The MovieLens-1M loader on the synthetic sample and on hand-made files: the format, the
//! Latin-1 decoding, errors naming file and line, and the next-genre task built from it.

use std::path::{Path, PathBuf};

use pgrpo::tasks::movielens::{
    synthetic, Gender, Grouping, MovieLens, NextGenreTask, TaskConfig, AGE_BRACKETS, GENRES,
};
use pgrpo::Error;

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("movielens")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample(name: &str) -> (PathBuf, MovieLens) {
    let dir = tmp(name);
    synthetic::write_sample(&dir, &synthetic::SampleConfig::default()).unwrap();
    let data = MovieLens::load(&dir).unwrap();
    (dir, data)
}

const USERS: &str = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n";
const MOVIES: &str = "1::Toy Story (1995)::Animation|Children's|Comedy\n\
                      2::Jumanji (1995)::Adventure|Children's|Fantasy\n\
                      3::Heat (1995)::Action|Crime|Thriller\n";
const RATINGS: &str = "1::1::5::978300760\n1::2::3::978302109\n2::3::4::978301968\n\
                       3::1::4::978300275\n3::3::5::978824291\n";

fn write(dir: &Path, users: &[u8], movies: &[u8], ratings: &[u8]) {
    std::fs::write(dir.join("users.dat"), users).unwrap();
    std::fs::write(dir.join("movies.dat"), movies).unwrap();
    std::fs::write(dir.join("ratings.dat"), ratings).unwrap();
}

/// Loads a folder whose files are the good ones above with `file` replaced by `text`, and
/// returns the error.
fn load_with(name: &str, file: &str, text: &str) -> Error {
    let dir = tmp(name);
    let pick = |f: &str, good: &'static str| if f == file { text } else { good };
    write(
        &dir,
        pick("users.dat", USERS).as_bytes(),
        pick("movies.dat", MOVIES).as_bytes(),
        pick("ratings.dat", RATINGS).as_bytes(),
    );
    MovieLens::load(&dir).expect_err("the folder has a malformed line")
}

/// Asserts `e` is a parse error of `file` at `line` whose message contains `needle`, and that
/// its text reads `<path>:<line>: ...`.
fn assert_parse_error(e: &Error, file: &str, line: usize, needle: &str) {
    match e {
        Error::Parse {
            path,
            line: got,
            reason,
        } => {
            assert!(path.ends_with(file), "{e}");
            assert_eq!(*got, line, "{e}");
            assert!(reason.contains(needle), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{}:{line}: ", path.display())),
                "{e}"
            );
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn hand_written_files_load_field_by_field() {
    let dir = tmp("good");
    write(
        &dir,
        USERS.as_bytes(),
        MOVIES.as_bytes(),
        RATINGS.as_bytes(),
    );
    let data = MovieLens::load(&dir).unwrap();
    assert_eq!(data.users().len(), 3);
    assert_eq!(data.movies().len(), 3);
    assert_eq!(data.ratings().len(), 5);
    let u = data.user(1).unwrap();
    assert_eq!(
        (u.gender, u.age, u.occupation, u.zip.as_str()),
        (Gender::Female, 1, 10, "48067")
    );
    assert_eq!(u.age_bracket(), "Under 18");
    assert_eq!(u.occupation_name(), "K-12 student");
    assert_eq!(data.user(2).unwrap().age_bracket(), "56+");
    let m = data.movie(2).unwrap();
    assert_eq!(m.title, "Jumanji (1995)");
    assert_eq!(m.genres, ["Adventure", "Children's", "Fantasy"]);
    let r = data.ratings()[1];
    assert_eq!(
        (r.user, r.movie, r.stars, r.timestamp),
        (1, 2, 3, 978_302_109)
    );
    assert!(data.user(99).is_none());
}

#[test]
fn latin1_crlf_and_blank_lines() {
    let dir = tmp("latin1");
    // "Misérables" in ISO-8859-1 (é = 0xE9), CRLF line ends, a blank line, and a UTF-8 line.
    let mut movies = b"1::Les Mis\xe9rables (1995)::Drama|Musical\r\n\r\n".to_vec();
    movies.extend("2::Amélie (2001)::Comedy|Romance\r\n".as_bytes());
    movies.extend(b"3::Heat (1995)::Action\n");
    write(&dir, USERS.as_bytes(), &movies, RATINGS.as_bytes());
    let data = MovieLens::load(&dir).unwrap();
    assert_eq!(data.movie(1).unwrap().title, "Les Misérables (1995)");
    assert_eq!(data.movie(1).unwrap().genres, ["Drama", "Musical"]);
    assert_eq!(data.movie(2).unwrap().title, "Amélie (2001)");
    assert_eq!(data.movie(3).unwrap().genres, ["Action"]);
}

#[test]
fn malformed_ratings_name_file_and_line() {
    let bad = |line3: &str| format!("1::1::5::978300760\n1::2::3::978302109\n{line3}\n");
    let e = load_with("r-fields", "ratings.dat", &bad("2::3::4"));
    assert_parse_error(&e, "ratings.dat", 3, "expected 4 `::`-separated fields");
    let e = load_with("r-stars", "ratings.dat", &bad("2::3::6::978301968"));
    assert_parse_error(&e, "ratings.dat", 3, "Rating 6 is outside 1-5");
    let e = load_with("r-zero", "ratings.dat", &bad("2::3::0::978301968"));
    assert_parse_error(&e, "ratings.dat", 3, "outside 1-5");
    let e = load_with("r-movie", "ratings.dat", &bad("2::x::4::978301968"));
    assert_parse_error(&e, "ratings.dat", 3, "MovieID \"x\" is not a valid number");
    let e = load_with("r-time", "ratings.dat", &bad("2::3::4::soon"));
    assert_parse_error(&e, "ratings.dat", 3, "Timestamp");
    let e = load_with("r-user", "ratings.dat", &bad("9::3::4::978301968"));
    assert_parse_error(&e, "ratings.dat", 3, "user 9 is not in users.dat");
    let e = load_with(
        "r-unknown-movie",
        "ratings.dat",
        &bad("2::77::4::978301968"),
    );
    assert_parse_error(&e, "ratings.dat", 3, "movie 77 is not in movies.dat");
    // Comma-separated (the ml-latest format) is not this format.
    let e = load_with("r-csv", "ratings.dat", "1,1,5,978300760\n");
    assert_parse_error(&e, "ratings.dat", 1, "found 1");
}

#[test]
fn malformed_users_and_movies_name_file_and_line() {
    let e = load_with(
        "u-gender",
        "users.dat",
        "1::F::1::10::48067\n2::X::56::16::70072\n",
    );
    assert_parse_error(&e, "users.dat", 2, "Gender \"X\" is neither M nor F");
    let e = load_with("u-age", "users.dat", "1::F::30::10::48067\n");
    assert_parse_error(&e, "users.dat", 1, "Age 30 is not one of the codes");
    let e = load_with("u-occ", "users.dat", "1::F::1::21::48067\n");
    assert_parse_error(&e, "users.dat", 1, "Occupation 21 is outside 0-20");
    let e = load_with(
        "u-dup",
        "users.dat",
        "1::F::1::10::48067\n\n1::M::18::4::10001\n",
    );
    assert_parse_error(&e, "users.dat", 3, "UserID 1 was already listed on line 1");
    let e = load_with("u-fields", "users.dat", "1::F::1::10\n");
    assert_parse_error(&e, "users.dat", 1, "expected 5 `::`-separated fields");

    let e = load_with("m-fields", "movies.dat", "1::Toy Story (1995)\n");
    assert_parse_error(&e, "movies.dat", 1, "found 2");
    let e = load_with("m-one", "movies.dat", "just a title\n");
    assert_parse_error(&e, "movies.dat", 1, "found 1");
    let e = load_with("m-id", "movies.dat", "one::Toy Story (1995)::Comedy\n");
    assert_parse_error(&e, "movies.dat", 1, "MovieID \"one\"");
    let e = load_with("m-genre", "movies.dat", "1::Toy Story (1995)::\n");
    assert_parse_error(&e, "movies.dat", 1, "no genre");
    let e = load_with(
        "m-dup",
        "movies.dat",
        "1::Toy Story (1995)::Comedy\n1::Heat (1995)::Action\n",
    );
    assert_parse_error(
        &e,
        "movies.dat",
        2,
        "MovieID 1 was already listed on line 1",
    );
}

#[test]
fn a_missing_file_is_a_file_error_naming_it() {
    let dir = tmp("missing");
    std::fs::write(dir.join("users.dat"), USERS).unwrap();
    let e = MovieLens::load(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::File { path, .. } if path.ends_with("movies.dat")),
        "{e:?}"
    );
}

#[test]
fn the_sample_is_in_the_format_and_deterministic() {
    let (dir, data) = sample("sample");
    let cfg = synthetic::SampleConfig::default();
    assert_eq!(data.users().len(), cfg.users);
    assert_eq!(data.movies().len(), cfg.movies);
    let n = data.ratings().len();
    assert!((cfg.users * cfg.min_ratings..=cfg.users * cfg.max_ratings).contains(&n));
    // Every user has between min and max ratings, no movie twice.
    for u in data.users() {
        let mut movies: Vec<u32> = data
            .ratings()
            .iter()
            .filter(|r| r.user == u.id)
            .map(|r| r.movie)
            .collect();
        assert!((cfg.min_ratings..=cfg.max_ratings).contains(&movies.len()));
        movies.sort_unstable();
        movies.dedup();
        assert!((cfg.min_ratings..=cfg.max_ratings).contains(&movies.len()));
    }
    // Genres come from the ML-1M list; some titles need Latin-1.
    assert!(data
        .movies()
        .iter()
        .all(|m| m.genres.iter().all(|g| GENRES.contains(&g.as_str()))));
    assert!(data.movies().iter().any(|m| m.title.contains('é')));
    let raw = std::fs::read(dir.join("movies.dat")).unwrap();
    assert!(
        std::str::from_utf8(&raw).is_err(),
        "movies.dat is Latin-1, not UTF-8"
    );
    assert!(raw.contains(&0xE9));
    // Every line of every file has the documented number of `::` fields.
    for (file, fields) in [("users.dat", 5), ("ratings.dat", 4), ("movies.dat", 3)] {
        let raw = std::fs::read(dir.join(file)).unwrap();
        let text: String = raw.iter().map(|&b| b as char).collect();
        assert!(text.ends_with('\n'));
        assert!(
            text.lines().all(|l| l.split("::").count() == fields),
            "{file}"
        );
    }
    // Same seed, same bytes; another seed, other bytes.
    let again = tmp("sample-again");
    synthetic::write_sample(&again, &cfg).unwrap();
    let other = tmp("sample-other");
    synthetic::write_sample(&other, &synthetic::SampleConfig { seed: 1, ..cfg }).unwrap();
    for file in ["users.dat", "movies.dat", "ratings.dat"] {
        let a = std::fs::read(dir.join(file)).unwrap();
        assert_eq!(a, std::fs::read(again.join(file)).unwrap(), "{file}");
        assert_ne!(a, std::fs::read(other.join(file)).unwrap(), "{file}");
    }
}

#[test]
fn sample_config_is_checked() {
    let dir = tmp("bad-sample");
    for cfg in [
        synthetic::SampleConfig {
            users: 0,
            ..Default::default()
        },
        synthetic::SampleConfig {
            min_ratings: 70,
            ..Default::default()
        },
        synthetic::SampleConfig {
            movies: 10,
            ..Default::default()
        },
    ] {
        let e = synthetic::write_sample(&dir, &cfg).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    }
}

#[test]
fn next_genre_task_on_the_sample() {
    let (_, data) = sample("task");
    let task = NextGenreTask::new(&data, &TaskConfig::default()).unwrap();
    assert_eq!(task.genres.len(), 18);
    assert_eq!(task.groups, AGE_BRACKETS.map(|(_, b)| b));
    assert_eq!(task.num_features(), 30 + 18);
    assert!(!task.train.is_empty() && !task.test.is_empty());
    let n = (task.train.len() + task.test.len()) as f64;
    assert!((task.test.len() as f64 / n - 0.2).abs() < 0.05);
    for e in task.train.iter().chain(&task.test) {
        assert_eq!(e.features.len(), task.num_features());
        assert!(e.features.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert!(!e.targets.is_empty());
        assert!(e.targets.iter().all(|&t| (t as usize) < task.num_actions()));
        let user = data.user(e.user).unwrap();
        assert_eq!(task.groups[e.group], user.age_bracket());
        assert_eq!(e.features[user.age_index()], 1.0);
    }
    // Targets are liked movies only.
    let liked = data.ratings().iter().filter(|r| r.stars >= 4).count();
    assert!(task.train.len() + task.test.len() <= liked);

    // A uniform policy's hit rate is |targets| / 18 on average.
    let uniform = vec![vec![1.0 / 18.0; 18]; task.test.len()];
    let hits = task.hit_rates(&task.test, &uniform).unwrap();
    for (k, h) in hits.iter().enumerate() {
        let ex: Vec<_> = task.test.iter().filter(|e| e.group == k).collect();
        let expect =
            ex.iter().map(|e| e.targets.len() as f64).sum::<f64>() / 18.0 / ex.len() as f64;
        assert!((h - expect).abs() < 1e-6, "group {k}: {h} vs {expect}");
    }
    assert!(task.hit_rates(&task.test, &uniform[1..]).is_err());

    // The groups differ in what they like: the most frequent target genre is not the same for
    // the youngest and the oldest bracket, and the majority-genre baseline beats uniform.
    let top = |k: usize| {
        let mut c = [0usize; 18];
        for e in task.train.iter().filter(|e| e.group == k) {
            for &t in &e.targets {
                c[t as usize] += 1;
            }
        }
        (0..18).max_by_key(|&i| c[i]).unwrap()
    };
    assert_ne!(top(0), top(6));
    let base = task.majority_genre_baseline();
    for (k, b) in base.iter().enumerate() {
        assert!(
            *b > hits[k],
            "group {k}: baseline {b} vs uniform {}",
            hits[k]
        );
    }
}

#[test]
fn other_groupings_and_bad_task_configs() {
    let (_, data) = sample("groupings");
    let by_gender = NextGenreTask::new(
        &data,
        &TaskConfig {
            grouping: Grouping::Gender,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(by_gender.groups, ["F", "M"]);
    let by_job = NextGenreTask::new(
        &data,
        &TaskConfig {
            grouping: Grouping::Occupation,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(by_job.groups.len() > 10);
    assert!(by_job.groups.iter().all(|g| !g.contains('/')));
    assert!(by_job.groups.contains(&"academic-educator".to_owned()));
    assert!("nationality".parse::<Grouping>().is_err());

    for cfg in [
        TaskConfig {
            history_len: 0,
            ..Default::default()
        },
        TaskConfig {
            min_stars: 6,
            ..Default::default()
        },
        TaskConfig {
            test_fraction: 1.0,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            NextGenreTask::new(&data, &cfg),
            Err(Error::InvalidConfig { .. })
        ));
    }
}
