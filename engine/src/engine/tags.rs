//! Tag commands: removing a tag takes it off every card.

use crate::command::{CommandError, ErrorCode};
use crate::ids::TagId;

use super::commands::err;
use super::Engine;

impl Engine {
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
