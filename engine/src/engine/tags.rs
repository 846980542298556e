//! Tag and attribute commands: the labels an operator puts on cards.
//! Tags are declared, bound to cards and removed (removing a tag takes it
//! off every card); attribute names are declared before cards carry them,
//! and values are set card by card (`upsert_card`) or in batches.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{
    CardResult, CommandError, ErrorCode, TagSpec, MAX_ATTRIBUTE_NAMES, MAX_TAGS, MAX_TAGS_PER_CARD,
};
use crate::ids::{Iccid, TagId};

use super::commands::err;
use super::Engine;

impl Engine {
    pub(super) fn upsert_tag(&mut self, tag: &TagSpec) -> Result<(), CommandError> {
        if !self.registry.tags.contains_key(&tag.name) {
            if self.registry.tags.len() >= MAX_TAGS {
                return Err(err(
                    ErrorCode::TagLimitReached,
                    format!("an operator has at most {MAX_TAGS} tags"),
                ));
            }
            let index = self.registry.tag_names.len() as u32;
            self.registry.tag_names.push(Some(tag.name.clone()));
            self.registry
                .tags
                .insert(tag.name.clone(), (index, tag.clone()));
        } else if let Some(entry) = self.registry.tags.get_mut(&tag.name) {
            entry.1 = tag.clone();
        }
        Ok(())
    }

    /// Binds `tags` to each card of the batch (`bound`), or unbinds them.
    pub(super) fn set_tags_bound(
        &mut self,
        iccids: &[Iccid],
        tags: &[TagId],
        bound: bool,
    ) -> Result<Vec<CardResult>, CommandError> {
        let indexes = self.tag_indexes(tags)?;
        Ok(self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            let shard = &mut e.shards[loc.shard as usize];
            let mut current: BTreeSet<u32> = shard.tags_of(loc.slot).iter().copied().collect();
            for t in &indexes {
                if bound {
                    current.insert(*t);
                } else {
                    current.remove(t);
                }
            }
            if current.len() > MAX_TAGS_PER_CARD {
                return Err(err(
                    ErrorCode::TooManyTags,
                    format!(
                        "card {} would hold {} tags; at most {MAX_TAGS_PER_CARD}",
                        shard.cards[loc.slot as usize].iccid,
                        current.len()
                    ),
                ));
            }
            shard.set_tags(loc.slot, &current.into_iter().collect::<Vec<_>>());
            Ok(())
        }))
    }

    pub(super) fn set_attribute_names(&mut self, names: &[String]) -> Result<(), CommandError> {
        if names.len() > MAX_ATTRIBUTE_NAMES {
            return Err(err(
                ErrorCode::InvalidAttribute,
                format!(
                    "{} attribute names; at most {MAX_ATTRIBUTE_NAMES}",
                    names.len()
                ),
            ));
        }
        let unique: BTreeSet<&String> = names.iter().collect();
        if unique.len() != names.len() || names.iter().any(String::is_empty) {
            return Err(err(
                ErrorCode::InvalidAttribute,
                "attribute names must be non-empty and distinct",
            ));
        }
        self.registry.attribute_names = names.to_vec();
        // A name declared again stays disabled; one no longer declared
        // is forgotten.
        self.registry
            .disabled_attributes
            .retain(|n| names.contains(n));
        Ok(())
    }

    /// Enables or disables a declared attribute name. One that an enabled
    /// rule filters on stays enabled (`attribute_in_use`).
    pub(super) fn set_attribute_enabled(
        &mut self,
        name: &str,
        enable: bool,
    ) -> Result<(), CommandError> {
        if !self.registry.attribute_names.iter().any(|n| n == name) {
            return Err(err(
                ErrorCode::InvalidAttribute,
                format!("attribute {name:?} is not declared (set_attribute_names)"),
            ));
        }
        if enable {
            self.registry.disabled_attributes.remove(name);
            return Ok(());
        }
        if let Some(rule) = self
            .registry
            .rules
            .values()
            .find(|r| r.enabled && r.filter.attributes.contains_key(name))
        {
            return Err(err(
                ErrorCode::AttributeInUse,
                format!("attribute {name:?} is used by enabled rule {:?}", rule.id),
            ));
        }
        self.registry.disabled_attributes.insert(name.to_owned());
        Ok(())
    }

    /// Checks that every attribute name is declared and enabled.
    pub(super) fn check_attribute_names<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), CommandError> {
        for name in names {
            if !self.registry.attribute_names.contains(name) {
                return Err(err(
                    ErrorCode::InvalidAttribute,
                    format!("attribute {name:?} is not declared (set_attribute_names)"),
                ));
            }
            if self.registry.disabled_attributes.contains(name) {
                return Err(err(
                    ErrorCode::AttributeDisabled,
                    format!("attribute {name:?} is disabled (enable_attribute)"),
                ));
            }
        }
        Ok(())
    }

    /// Sets (or, for `None`, removes) attribute values on each card.
    pub(super) fn set_attributes(
        &mut self,
        iccids: &[Iccid],
        attributes: &BTreeMap<String, Option<String>>,
    ) -> Result<Vec<CardResult>, CommandError> {
        if attributes.is_empty() {
            return Err(err(
                ErrorCode::InvalidAttribute,
                "set_attributes names no attribute",
            ));
        }
        self.check_attribute_names(attributes.keys())?;
        Ok(self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            let shard = &mut e.shards[loc.shard as usize];
            let extra = shard.extra_mut(loc.slot);
            for (name, value) in attributes {
                match value {
                    Some(v) => extra.attributes.insert(name.clone(), v.clone()),
                    None => extra.attributes.remove(name),
                };
            }
            shard.drop_empty_extra(loc.slot);
            Ok(())
        }))
    }

    pub(super) fn remove_tag(&mut self, tag: &TagId) -> Result<(), CommandError> {
        let Some(&(index, _)) = self.registry.tags.get(tag) else {
            return Err(err(ErrorCode::UnknownTag, format!("no tag {tag}")));
        };
        if let Some(rule) = self
            .registry
            .rules
            .values()
            .find(|r| r.enabled && r.filter.tags.contains(tag))
        {
            return Err(err(
                ErrorCode::TagInUse,
                format!("tag {tag} is used by enabled rule {:?}", rule.id),
            ));
        }
        self.registry.tags.remove(tag);
        self.registry.tag_names[index as usize] = None;
        for shard in &mut self.shards {
            for slot in crate::shard::slots_with_tag(shard, index) {
                let tags: Vec<u32> = shard
                    .tags_of(slot)
                    .iter()
                    .copied()
                    .filter(|t| *t != index)
                    .collect();
                shard.set_tags(slot, &tags);
            }
        }
        Ok(())
    }
}
