//! Membership arithmetic shared by the embedded engines: what a
//! `put_group` or `update_group` changes, computed the same way everywhere.

use std::collections::BTreeSet;

/// Sorted and unique.
pub fn normalise(members: Vec<String>) -> Vec<String> {
    let set: BTreeSet<String> = members.into_iter().collect();
    set.into_iter().collect()
}

/// Whether `user` is in the sorted list `members`.
pub fn contains(members: &[String], user: &str) -> bool {
    members.binary_search_by(|m| m.as_str().cmp(user)).is_ok()
}

/// A group replaced by `new` (normalised here): the new member list, who was
/// added and who was removed compared with `old`.
pub fn replace(old: &[String], new: Vec<String>) -> (Vec<String>, Vec<String>, Vec<String>) {
    let members = normalise(new);
    let old: BTreeSet<&String> = old.iter().collect();
    let new: BTreeSet<&String> = members.iter().collect();
    let added = new.difference(&old).map(|s| (*s).clone()).collect();
    let removed = old.difference(&new).map(|s| (*s).clone()).collect();
    (members, added, removed)
}

/// `members` after removing `remove` and adding `add`: the new list, who was
/// added and who was removed. A user removed and added in one call is no change.
pub fn update(members: &[String], add: Vec<String>, remove: Vec<String>) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut set: BTreeSet<String> = members.iter().cloned().collect();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for u in normalise(remove) {
        if set.remove(&u) {
            removed.push(u);
        }
    }
    for u in normalise(add) {
        if set.insert(u.clone()) {
            // Removed and added in one call: still a member, no change.
            if let Some(i) = removed.iter().position(|r| *r == u) {
                removed.remove(i);
            } else {
                added.push(u);
            }
        }
    }
    (set.into_iter().collect(), added, removed)
}
