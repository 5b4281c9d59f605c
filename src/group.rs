//! Preference-group labels.
//!
//! P-GRPO gives every prompt a preference-group label (a persona, a user cluster, a rating
//! bucket). A [`GroupKey`] is that label: a name such as `"formal"` or an integer id.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The label of a preference group: an integer id or a name.
///
/// Keys order ids before names (ids numerically, names lexicographically), which fixes the
/// iteration order of a [`RewardHistory`](crate::RewardHistory) and of per-group metrics.
/// In JSON an id is a number and a name a string.
///
/// ```
/// use pgrpo::GroupKey;
/// let a: GroupKey = "formal".into();
/// let b: GroupKey = 3u32.into();
/// assert_eq!(a.to_string(), "formal");
/// assert_eq!(b.to_string(), "3");
/// assert!(b < a);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GroupKey {
    /// An integer id.
    Id(u64),
    /// A name.
    Name(String),
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupKey::Id(i) => write!(f, "{i}"),
            GroupKey::Name(s) => f.write_str(s),
        }
    }
}

impl From<&str> for GroupKey {
    fn from(s: &str) -> Self {
        GroupKey::Name(s.to_owned())
    }
}

impl From<String> for GroupKey {
    fn from(s: String) -> Self {
        GroupKey::Name(s)
    }
}

impl From<&GroupKey> for GroupKey {
    fn from(k: &GroupKey) -> Self {
        k.clone()
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for GroupKey {
            fn from(i: $t) -> Self {
                GroupKey::Id(i as u64)
            }
        }
    )*};
}
from_int!(u8, u16, u32, u64, usize);
