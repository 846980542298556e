//! Plain-text email and SMS renderings of a firing, from the same template
//! parameters as the webhook bodies (so every channel says the same thing).

use flowcap_engine::event::RuleFiredEvent;

use crate::template::{format_time, template, Template, TemplateName, TemplateOptions};

/// An email: subject and plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

/// The one-sentence message of a template.
pub fn sentence(t: &Template) -> String {
    let v = |key: &str| t.get(key).unwrap_or_default().to_owned();
    let plan = |t: &Template| match t.get("pricePlanName") {
        Some(p) if !p.is_empty() => format!(" ({p})"),
        _ => String::new(),
    };
    match t.name {
        TemplateName::PricePlanExpired => {
            let days: i64 = v("daysToExpire").parse().unwrap_or(0);
            let when = match days {
                d if d < 0 => format!("expired {} day(s) ago", -d),
                0 => "expires today".to_owned(),
                1 => "expires in 1 day".to_owned(),
                d => format!("expires in {d} days"),
            };
            format!("The plan{} of card {} {when}.", plan(t), v("cid"))
        }
        TemplateName::FlowUsageRemain => format!(
            "Card {}{} has {} MB left in this cycle.",
            v("cid"),
            plan(t),
            v("remainFlow")
        ),
        TemplateName::FlowUsage => format!(
            "Card {}{} has used {} MB in this cycle.",
            v("cid"),
            plan(t),
            v("usageFlow")
        ),
        TemplateName::SimStatusModify => format!(
            "Card {} changed from {} to {} at {}.",
            v("cid"),
            v("oldStatus"),
            v("newStatus"),
            v("modifyTime")
        ),
        TemplateName::PoolFlowUsageRemain => format!(
            "Pool {}{} has {} MB left in this cycle.",
            pool_label(t),
            plan(t),
            v("remainFlow")
        ),
        TemplateName::BackPoolFlowUsage => format!(
            "Pool {}{} has used {} MB in this cycle.",
            pool_label(t),
            plan(t),
            v("usageFlow")
        ),
    }
}

fn pool_label(t: &Template) -> String {
    let id = t.get("poolId").unwrap_or_default();
    match t.get("poolName") {
        Some(name) if !name.is_empty() && name != id => format!("{name} [{id}]"),
        _ => id.to_owned(),
    }
}

fn rule_label(firing: &RuleFiredEvent) -> String {
    if firing.rule_name.is_empty() {
        firing.rule.clone()
    } else {
        format!("{} [{}]", firing.rule_name, firing.rule)
    }
}

/// The email for a firing: the sentence as subject and first line, then
/// the rule, its condition, the parameters and the firing id.
pub fn email(firing: &RuleFiredEvent, options: TemplateOptions) -> Email {
    let t = template(firing, options);
    let line = sentence(&t);
    let mut body = format!("{line}\n\nRule: {}\n", rule_label(firing));
    body.push_str(&format!("Condition: {}\n", firing.condition.to_json()));
    body.push_str(&format!(
        "Time: {}\n",
        format_time(firing.event_time, options.utc_offset_secs)
    ));
    body.push_str(&format!("Template: {}\n", t.name.as_str()));
    for p in &t.params {
        body.push_str(&format!("  {}: {}\n", p.key, p.value));
    }
    body.push_str(&format!("Firing id: {}\n", firing.id));
    Email {
        subject: format!("[flowcap] {}: {line}", rule_label(firing)),
        body,
    }
}

/// The SMS for a firing: the sentence, prefixed with the rule name; at
/// most 280 characters.
pub fn sms(firing: &RuleFiredEvent, options: TemplateOptions) -> String {
    let text = format!(
        "[flowcap {}] {}",
        rule_label(firing),
        sentence(&template(firing, options))
    );
    text.chars().take(280).collect()
}
