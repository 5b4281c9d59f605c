//! The map behind [`RewardHistory`](super::RewardHistory): group keys in increasing order
//! next to their states, in two plain vectors.
//!
//! A batch names its groups by increasing keys (`0..k` in the trainer), so the store is read
//! by walking both sorted lists together — one comparison per key, contiguous memory — and a
//! single key is found by binary search. Groups a batch adds are merged in once, in one pass,
//! not inserted one by one. Iteration is in key order, as a `BTreeMap`'s was.

use super::GroupState;
use crate::GroupKey;

/// Sorted, distinct `keys` and the `states` index-aligned with them.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Groups {
    keys: Vec<GroupKey>,
    states: Vec<GroupState>,
}

impl Groups {
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.states.clear();
    }

    pub(super) fn get(&self, key: &GroupKey) -> Option<&GroupState> {
        let i = self.keys.binary_search(key).ok()?;
        Some(&self.states[i])
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&GroupKey, &GroupState)> + '_ {
        self.keys.iter().zip(&self.states)
    }

    /// The stored keys, in increasing order.
    pub(super) fn keys(&self) -> &[GroupKey] {
        &self.keys
    }

    pub(super) fn state(&self, i: usize) -> &GroupState {
        &self.states[i]
    }

    pub(super) fn state_mut(&mut self, i: usize) -> &mut GroupState {
        &mut self.states[i]
    }

    /// Whether `keys` are exactly the stored keys, in order.
    pub(super) fn stored_in_order(&self, keys: &[GroupKey]) -> bool {
        self.keys.as_slice() == keys
    }

    pub(super) fn states_mut(&mut self) -> &mut [GroupState] {
        &mut self.states
    }

    /// Where each of `keys` is stored (`None`: not stored). Strictly increasing keys are
    /// found in one walk beside the stored ones; any other order by a binary search each.
    pub(super) fn positions(&self, keys: &[GroupKey]) -> Vec<Option<usize>> {
        if !increasing(keys) {
            return keys
                .iter()
                .map(|k| self.keys.binary_search(k).ok())
                .collect();
        }
        let mut j = self.keys.partition_point(|s| *s < keys[0]);
        keys.iter()
            .map(|key| {
                while j < self.keys.len() && self.keys[j] < *key {
                    j += 1;
                }
                (j < self.keys.len() && self.keys[j] == *key).then_some(j)
            })
            .collect()
    }

    /// The state of `key`, inserted (default) if it is not stored. One insertion costs a
    /// shift of the later entries: for many new groups use [`insert_new`](Self::insert_new).
    pub(super) fn entry(&mut self, key: GroupKey) -> &mut GroupState {
        let i = match self.keys.binary_search(&key) {
            Ok(i) => i,
            Err(i) => {
                self.keys.insert(i, key);
                self.states.insert(i, GroupState::default());
                i
            }
        };
        &mut self.states[i]
    }

    /// Inserts `key` with `state`; `false` (and nothing changes) if it is already stored.
    pub(super) fn insert(&mut self, key: GroupKey, state: GroupState) -> bool {
        match self.keys.binary_search(&key) {
            Ok(_) => false,
            Err(i) => {
                self.keys.insert(i, key);
                self.states.insert(i, state);
                true
            }
        }
    }

    /// Adds groups none of which is stored, given in any order, the same key possibly more
    /// than once: each key's items are combined by `fold` in the order given, and the
    /// result is merged into the sorted lists in one pass.
    pub(super) fn insert_new<T>(
        &mut self,
        mut new: Vec<(GroupKey, T)>,
        mut fold: impl FnMut(&mut GroupState, T),
    ) {
        if new.is_empty() {
            return;
        }
        // Stable: a key's items keep their order.
        new.sort_by(|a, b| a.0.cmp(&b.0));
        let mut added: Vec<(GroupKey, GroupState)> = Vec::with_capacity(new.len());
        for (key, item) in new {
            match added.last_mut() {
                Some((last, state)) if *last == key => fold(state, item),
                _ => {
                    let mut state = GroupState::default();
                    fold(&mut state, item);
                    added.push((key, state));
                }
            }
        }
        let old_keys = std::mem::take(&mut self.keys);
        let old_states = std::mem::take(&mut self.states);
        let total = old_keys.len() + added.len();
        self.keys.reserve(total);
        self.states.reserve(total);
        let mut old = old_keys.into_iter().zip(old_states).peekable();
        let mut add = added.into_iter().peekable();
        loop {
            let take_old = match (old.peek(), add.peek()) {
                (Some(o), Some(a)) => o.0 < a.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_old { old.next() } else { add.next() };
            let Some((k, s)) = next else { break };
            self.keys.push(k);
            self.states.push(s);
        }
    }
}

/// Whether `keys` is non-empty and strictly increasing: then they can be looked up in one
/// ordered walk over the stored groups.
fn increasing(keys: &[GroupKey]) -> bool {
    !keys.is_empty() && keys.windows(2).all(|w| w[0] < w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(seen: u64) -> GroupState {
        GroupState {
            seen,
            ..GroupState::default()
        }
    }

    #[test]
    fn positions_walk_equals_search_and_insert_new_keeps_order() {
        let mut g = Groups::default();
        for k in [5u64, 1, 9, 3] {
            assert!(g.insert(GroupKey::Id(k), state(k)));
        }
        assert!(!g.insert(GroupKey::Id(3), state(0)), "a key is stored once");
        let keys: Vec<GroupKey> = [0u64, 1, 2, 3, 9, 10]
            .into_iter()
            .map(GroupKey::Id)
            .chain(["a".into()])
            .collect();
        let walked = g.positions(&keys);
        let searched: Vec<_> = keys.iter().map(|k| g.keys.binary_search(k).ok()).collect();
        assert_eq!(walked, searched);
        assert_eq!(
            walked,
            vec![None, Some(0), None, Some(1), Some(3), None, None]
        );
        // Unordered keys take the search.
        let rev: Vec<GroupKey> = keys.iter().rev().cloned().collect();
        let mut back = g.positions(&rev);
        back.reverse();
        assert_eq!(back, walked);
        // New keys in any order, one of them twice: folded in the order given.
        g.insert_new(
            vec![
                (GroupKey::Id(7), 1u64),
                ("b".into(), 2),
                (GroupKey::Id(0), 3),
                (GroupKey::Id(7), 4),
            ],
            |s, x| s.seen = s.seen * 10 + x,
        );
        let got: Vec<(GroupKey, u64)> = g.iter().map(|(k, s)| (k.clone(), s.seen)).collect();
        let want: Vec<(GroupKey, u64)> = vec![
            (GroupKey::Id(0), 3),
            (GroupKey::Id(1), 1),
            (GroupKey::Id(3), 3),
            (GroupKey::Id(5), 5),
            (GroupKey::Id(7), 14),
            (GroupKey::Id(9), 9),
            ("b".into(), 2),
        ];
        assert_eq!(got, want);
        assert_eq!(g.entry(GroupKey::Id(4)).seen, 0);
        assert_eq!(g.len(), 8);
        assert!(g.keys.windows(2).all(|w| w[0] < w[1]));
    }
}
