//! A shard's cards: insertion, moving out, identities and tags. Kept
//! compact: MSISDN, IMSI and IMEI are packed digits beside the cards,
//! tag sets are interned, and what few cards have lives in `extras`.

use std::collections::BTreeSet;

use crate::domain::{CardState, Reasons};

use super::{Card, CardExtra, MovedCard, Shard, Trail, NO_POOL};

impl Shard {
    pub(crate) fn insert_card(
        &mut self,
        card: Card,
        extra: Option<CardExtra>,
        tags: &[u32],
    ) -> u32 {
        let slot = self.cards.len() as u32;
        let mut card = card;
        card.tagset = self.intern_tags(tags);
        card.pool = NO_POOL;
        let expires = card.expires_at;
        crate::directory::push_compact(&mut self.cards, card);
        if let Some(mut extra) = extra {
            let values = [extra.msisdn.take(), extra.imsi.take(), extra.imei.take()];
            self.extras.insert(slot, extra);
            for (which, value) in values.into_iter().enumerate() {
                self.set_ident(slot, which, value);
            }
            self.drop_empty_extra(slot);
        }
        self.schedule_card(slot, expires);
        slot
    }

    /// Sets a card's MSISDN (0), IMSI (1) or IMEI (2): packed when it is
    /// all digits, else kept as text in its `CardExtra`.
    pub(crate) fn set_ident(&mut self, slot: u32, which: usize, value: Option<String>) {
        let packed = value.as_deref().and_then(pack_digits);
        if packed.is_some() && self.idents.len() <= slot as usize {
            // Dense up to the highest card that has an identity: cards
            // without any cost nothing.
            self.idents.resize(slot as usize + 1, [0; 3]);
        }
        if let Some(idents) = self.idents.get_mut(slot as usize) {
            idents[which] = packed.unwrap_or(0);
        }
        let text = if packed.is_some() { None } else { value };
        if text.is_some() || self.extras.contains_key(&slot) {
            let extra = self.extras.entry(slot).or_default();
            match which {
                0 => extra.msisdn = text,
                1 => extra.imsi = text,
                _ => extra.imei = text,
            }
        }
        self.drop_empty_extra(slot);
    }

    /// A card's MSISDN (0), IMSI (1) or IMEI (2).
    pub(crate) fn ident(&self, slot: u32, which: usize) -> Option<String> {
        let packed = self.idents.get(slot as usize).map_or(0, |i| i[which]);
        unpack_digits(packed).or_else(|| {
            let extra = self.extras.get(&slot)?;
            match which {
                0 => extra.msisdn.clone(),
                1 => extra.imsi.clone(),
                _ => extra.imei.clone(),
            }
        })
    }

    pub(crate) fn drop_empty_extra(&mut self, slot: u32) {
        if self.extras.get(&slot).is_some_and(CardExtra::is_empty) {
            self.extras.remove(&slot);
        }
    }
    /// Takes a card out (it moves to another shard); the slot stays vacant.
    pub(crate) fn take_card(&mut self, slot: u32) -> MovedCard {
        let card = self.cards[slot as usize].clone();
        let tags = self.tagsets[card.tagset as usize].clone();
        let idents = [0, 1, 2].map(|which| self.ident(slot, which));
        if let Some(idents) = self.idents.get_mut(slot as usize) {
            *idents = [0; 3];
        }
        let mut extra = self.extras.remove(&slot).unwrap_or_default();
        [extra.msisdn, extra.imsi, extra.imei] = idents;
        let extra = Some(extra);
        let marks = self.take_marks(slot);
        let trail = self.trail(slot);
        if let Some(t) = self.trails.get_mut(slot as usize) {
            *t = Trail::NONE;
        }
        let closed = self.take_closed(slot);
        let vacated = &mut self.cards[slot as usize];
        vacated.vacant = true;
        vacated.lifecycle = CardState::Deregistered;
        vacated.reasons = Reasons::EMPTY;
        MovedCard {
            card,
            extra,
            tags,
            marks,
            trail,
            closed,
        }
    }

    /// The card's [`Trail`].
    pub(crate) fn trail(&self, slot: u32) -> Trail {
        self.trails
            .get(slot as usize)
            .copied()
            .unwrap_or(Trail::NONE)
    }

    /// The card's [`Trail`], to change.
    pub(crate) fn trail_mut(&mut self, slot: u32) -> &mut Trail {
        if self.trails.len() <= slot as usize {
            self.trails.resize(slot as usize + 1, Trail::NONE);
        }
        &mut self.trails[slot as usize]
    }

    /// Deregisters a card for good: it leaves its pool and loses its
    /// reasons; later usage is history only.
    pub(crate) fn deregister(&mut self, slot: u32) {
        self.touch(slot);
        self.leave_for_good(slot);
        let card = &mut self.cards[slot as usize];
        card.lifecycle = CardState::Deregistered;
        card.reasons = Reasons::EMPTY;
        card.separated = false;
    }

    pub(crate) fn tags_of(&self, slot: u32) -> &[u32] {
        &self.tagsets[self.cards[slot as usize].tagset as usize]
    }

    pub(crate) fn set_tags(&mut self, slot: u32, tags: &[u32]) {
        let set = self.intern_tags(tags);
        self.cards[slot as usize].tagset = set;
    }

    fn intern_tags(&mut self, tags: &[u32]) -> u32 {
        let mut set: Vec<u32> = tags.to_vec();
        set.sort_unstable();
        set.dedup();
        if let Some(&i) = self.tagset_index.get(&set) {
            return i;
        }
        let i = self.tagsets.len() as u32;
        self.tagsets.push(set.clone());
        self.tagset_index.insert(set, i);
        i
    }

    pub(crate) fn extra_mut(&mut self, slot: u32) -> &mut CardExtra {
        self.extras.entry(slot).or_default()
    }

    pub(crate) fn extra(&self, slot: u32) -> Option<&CardExtra> {
        self.extras.get(&slot)
    }
}

/// Packs 1 to 17 ASCII digits into a non-zero u64: the digit count in the
/// top 7 bits, the value below (10^17 < 2^57).
pub(crate) fn pack_digits(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > 17 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = bytes
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    Some((bytes.len() as u64) << 57 | value)
}

/// Reverses [`pack_digits`]; `None` for 0.
pub(crate) fn unpack_digits(packed: u64) -> Option<String> {
    let len = (packed >> 57) as usize;
    (len > 0).then(|| format!("{:0len$}", packed & ((1 << 57) - 1)))
}

/// Cards with the given tag index (helper for tag removal).
pub(crate) fn slots_with_tag(shard: &Shard, tag: u32) -> BTreeSet<u32> {
    shard
        .live_slots()
        .filter(|&s| shard.tags_of(s).contains(&tag))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_pack_and_unpack() {
        for text in [
            "0",
            "0012",
            "1440412345678",
            "460041234567890",
            "99999999999999999",
        ] {
            assert_eq!(
                unpack_digits(pack_digits(text).unwrap()).as_deref(),
                Some(text)
            );
        }
        for text in ["", "12a", "+8613800000000", "123456789012345678"] {
            assert_eq!(pack_digits(text), None);
        }
        assert_eq!(unpack_digits(0), None);
    }
}
