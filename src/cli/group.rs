//! `ringlog group list|describe|reset|delete`.
//!
//! Owns: those subcommands' arguments (including the `--to` syntax of a reset: earliest, latest,
//! an offset, or an RFC 3339 timestamp) and their output. Depends on `client::Admin`.

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;

use clap::{Args, Subcommand};

use super::{CliError, ConnectArgs};
use crate::client::{Admin, CommittedOffset, GroupDescription, GroupListing, ResetTarget, TopicPartitions};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups: state, member count. On a cluster, every group: each node that
    /// coordinates groups is asked.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a group's state, members and their partitions, and per partition the committed
    /// offset, the log end and the lag (log end minus committed).
    Describe {
        group: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Move a group's committed offsets on a topic; only while the group has no members.
    Reset(ResetArgs),
    /// Delete a group and its committed offsets; only while it has no members.
    Delete {
        group: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    pub group: String,
    #[arg(long)]
    pub topic: String,
    /// Only these partitions (repeatable; default: every partition of the topic).
    #[arg(long = "partition", value_name = "PARTITION")]
    pub partitions: Vec<u32>,
    /// earliest, latest, an offset (e.g. 1500), or a timestamp in RFC 3339 (e.g.
    /// 2026-11-28T12:00:00Z): the first offset at or after that time.
    #[arg(long, value_name = "earliest|latest|OFFSET|TIMESTAMP")]
    pub to: ResetTo,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// A parsed `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetTo(pub ResetTarget);

impl FromStr for ResetTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let target = match s {
            "earliest" => ResetTarget::Earliest,
            "latest" => ResetTarget::Latest,
            _ if s.bytes().all(|b| b.is_ascii_digit()) => ResetTarget::Offset(
                s.parse().map_err(|_| format!("{s:?} is too large for an offset"))?,
            ),
            _ => ResetTarget::Timestamp(parse_rfc3339_ms(s).ok_or_else(|| {
                format!("{s:?} is not earliest, latest, an offset or an RFC 3339 timestamp like 2026-11-28T12:00:00Z")
            })?),
        };
        Ok(ResetTo(target))
    }
}

pub(super) async fn run(command: GroupCommand) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        GroupCommand::List { connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            out.write_all(format_listing(&admin.list_groups().await?).as_bytes())
                .map_err(CliError::stdout)?;
        }
        GroupCommand::Describe { group, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            let description = admin.describe_group(&group).await?;
            let mut offsets = admin.group_offsets(&group, &[]).await?;
            // Assigned partitions without a commit yet still have a log end worth showing.
            let mut assigned: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for member in &description.members {
                for t in &member.assignment {
                    let have = |p: &u32| offsets.iter().any(|o| o.topic == t.topic && o.partition == *p);
                    assigned.entry(&t.topic).or_default().extend(t.partitions.iter().filter(|p| !have(p)));
                }
            }
            let missing: Vec<TopicPartitions> = assigned
                .into_iter()
                .filter(|(_, partitions)| !partitions.is_empty())
                .map(|(topic, partitions)| TopicPartitions { topic: topic.to_owned(), partitions })
                .collect();
            if !missing.is_empty() {
                offsets.extend(admin.group_offsets(&group, &missing).await?);
            }
            offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            out.write_all(format_description(&description, &offsets).as_bytes()).map_err(CliError::stdout)?;
        }
        GroupCommand::Reset(args) => {
            let admin = Admin::connect(args.connect.client_config()).await?;
            let offsets =
                admin.reset_group_offsets(&args.group, &args.topic, &args.partitions, args.to.0).await?;
            writeln!(out, "{:<24} {:<10} {:>16}", "TOPIC", "PARTITION", "NEW_OFFSET")
                .map_err(CliError::stdout)?;
            for o in &offsets {
                writeln!(out, "{:<24} {:<10} {:>16}", o.topic, o.partition, or_dash(o.offset))
                    .map_err(CliError::stdout)?;
            }
        }
        GroupCommand::Delete { group, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            admin.delete_group(&group).await?;
            writeln!(out, "deleted group {group}").map_err(CliError::stdout)?;
        }
    }
    out.flush().map_err(CliError::stdout)
}

fn or_dash(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn format_listing(groups: &[GroupListing]) -> String {
    let mut s = format!("{:<32} {:<20} {:>8} {}\n", "GROUP", "STATE", "MEMBERS", "PROTOCOL_TYPE");
    for g in groups {
        s.push_str(&format!("{:<32} {:<20} {:>8} {}\n", g.group_id, g.state, g.members, g.protocol_type));
    }
    s
}

/// The group's header, its members, then one row per partition:
/// `TOPIC PARTITION COMMITTED LOG_END LAG MEMBER` ("-" where unknown or unassigned).
fn format_description(d: &GroupDescription, offsets: &[CommittedOffset]) -> String {
    let mut s = format!(
        "group: {}\nstate: {}\nprotocol_type: {}\nprotocol: {}\ngeneration: {}\nleader: {}\nmembers: {}\n",
        d.group_id,
        d.state,
        d.protocol_type,
        d.protocol,
        d.generation_id,
        if d.leader_id.is_empty() { "-" } else { &d.leader_id },
        d.members.len(),
    );
    if !d.members.is_empty() {
        s.push_str(&format!("\n{:<48} {:<20} {}\n", "MEMBER", "CLIENT", "PARTITIONS"));
        for m in &d.members {
            let partitions: Vec<String> = m
                .assignment
                .iter()
                .map(|t| {
                    let list: Vec<String> = t.partitions.iter().map(u32::to_string).collect();
                    format!("{}:{}", t.topic, list.join(","))
                })
                .collect();
            s.push_str(&format!("{:<48} {:<20} {}\n", m.member_id, m.client_id, partitions.join(" ")));
        }
    }
    let owner = |topic: &str, partition: u32| {
        d.members
            .iter()
            .find(|m| m.assignment.iter().any(|t| t.topic == topic && t.partitions.contains(&partition)))
            .map_or("-", |m| m.member_id.as_str())
    };
    s.push_str(&format!(
        "\n{:<24} {:<10} {:>16} {:>16} {:>12} {}\n",
        "TOPIC", "PARTITION", "COMMITTED", "LOG_END", "LAG", "MEMBER"
    ));
    for o in offsets {
        s.push_str(&format!(
            "{:<24} {:<10} {:>16} {:>16} {:>12} {}\n",
            o.topic,
            o.partition,
            or_dash(o.offset),
            or_dash(o.log_end_offset),
            or_dash(o.lag),
            owner(&o.topic, o.partition)
        ));
    }
    s
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    fn num(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
        let digits = s.get(range)?;
        digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok())?
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(s, 0..4)?, num(s, 5..7)?, num(s, 8..10)?);
    let (hour, minute, second) = (num(s, 11..13)?, num(s, 14..16)?, num(s, 17..19)?);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Milliseconds: the first three digits, padded; finer digits are dropped.
        let ms: String = fraction[..digits].chars().chain("00".chars()).take(3).collect();
        millis = ms.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (num(rest, 1..3)?, num(rest, 4..6)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(seconds * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::GroupMember;

    #[test]
    fn reset_targets_parse() {
        assert_eq!("earliest".parse::<ResetTo>(), Ok(ResetTo(ResetTarget::Earliest)));
        assert_eq!("latest".parse::<ResetTo>(), Ok(ResetTo(ResetTarget::Latest)));
        assert_eq!("1500".parse::<ResetTo>(), Ok(ResetTo(ResetTarget::Offset(1500))));
        assert_eq!("1970-01-01T00:00:00Z".parse::<ResetTo>(), Ok(ResetTo(ResetTarget::Timestamp(0))));
        assert_eq!(
            "2026-11-28T12:00:00Z".parse::<ResetTo>(),
            Ok(ResetTo(ResetTarget::Timestamp(1_795_867_200_000)))
        );
        assert_eq!(parse_rfc3339_ms("2026-11-28T13:30:00.25+01:30"), Some(1_795_867_200_250));
        assert_eq!(parse_rfc3339_ms("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), Some(-1000));
        for bad in ["-3", "yesterday", "2026-02-29T00:00:00Z", "2026-11-28T12:00:00", "2026-11-28T25:00:00Z"]
        {
            assert!(bad.parse::<ResetTo>().is_err(), "{bad}");
        }
    }

    #[test]
    fn description_rows_show_committed_log_end_lag_and_owner() {
        let d = GroupDescription {
            group_id: "billing".into(),
            state: "Stable".into(),
            protocol_type: "consumer".into(),
            protocol: "range".into(),
            generation_id: 4,
            leader_id: "m-a".into(),
            members: vec![GroupMember {
                member_id: "m-a".into(),
                client_id: "ringlog-cli".into(),
                assignment: vec![TopicPartitions { topic: "orders".into(), partitions: vec![0, 1] }],
            }],
        };
        let offsets = [
            CommittedOffset {
                topic: "orders".into(),
                partition: 0,
                offset: Some(10),
                metadata: String::new(),
                log_end_offset: Some(12),
                lag: Some(2),
            },
            CommittedOffset {
                topic: "orders".into(),
                partition: 2,
                offset: None,
                metadata: String::new(),
                log_end_offset: Some(5),
                lag: None,
            },
        ];
        let text = format_description(&d, &offsets);
        assert!(text.contains("state: Stable\n"), "{text}");
        assert!(text.contains("m-a") && text.contains("orders:0,1"), "{text}");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("TOPIC"))
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            vec![vec!["orders", "0", "10", "12", "2", "m-a"], vec!["orders", "2", "-", "5", "-", "-"]]
        );
    }
}
