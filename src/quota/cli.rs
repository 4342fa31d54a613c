//! `tokenmeter quota …`: policies and their status, straight against the database (as the
//! operator, like `tokenmeter keys`).

use clap::{Args, Subcommand};
use sqlx::PgPool;

use super::{PolicyState, create_policy, status};
use crate::domain::pricing::parse_plain_decimal;
use crate::domain::quota::{Enforcement, Limit, Policy, Scope, Window, normalize_thresholds};
use crate::domain::tokens::TokenClass;
use crate::store::quotas::{self as store, Guarded, PolicyFilter, Selection};

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Create a policy.
    Create(CreateArgs),
    /// List a tenant's policies, enabled or not.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Delete a policy; its holds stop counting.
    Delete {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        policy: String,
    },
    /// Used / reserved / remaining and window end of the policies that apply to a call (the
    /// tenant's, plus the agent's and the service's when given).
    Status {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long)]
    tenant: String,
    /// Limit one agent of the tenant instead of the whole tenant.
    #[arg(long, conflicts_with = "service")]
    agent: Option<String>,
    /// Limit one service of the tenant instead of the whole tenant.
    #[arg(long)]
    service: Option<String>,
    /// day, week, month or billing_period (in the tenant's time zone).
    #[arg(long)]
    window: String,
    /// A token limit per window.
    #[arg(long, conflicts_with = "money", required_unless_present = "money")]
    tokens: Option<i64>,
    /// Token classes summed against a token limit (comma-separated; default all).
    #[arg(long, value_delimiter = ',', requires = "tokens")]
    classes: Vec<String>,
    /// A spend limit per window in the tenant's currency, e.g. 250.00.
    #[arg(long)]
    money: Option<String>,
    /// hard (deny) or soft (allow and flag).
    #[arg(long)]
    enforcement: String,
    /// Alert thresholds in basis points of the limit, e.g. 8000,10000.
    #[arg(long, value_delimiter = ',')]
    thresholds: Vec<i32>,
    #[arg(long, default_value = "")]
    name: String,
    /// Client-chosen id (default: generated).
    #[arg(long)]
    id: Option<String>,
}

pub async fn run(pool: &PgPool, command: QuotaCommand) -> anyhow::Result<()> {
    match command {
        QuotaCommand::Create(args) => {
            let policy = create_policy(pool, &policy_from(args, pool).await?).await?;
            println!("{}", describe(&policy));
        }
        QuotaCommand::List { tenant } => {
            let filter = PolicyFilter {
                agent_id: None,
                service: None,
                include_disabled: true,
            };
            for policy in store::list_policies(pool, &tenant, &filter, 0, i64::MAX).await? {
                println!("{}", describe(&policy));
            }
        }
        QuotaCommand::Delete { tenant, policy } => {
            match store::delete_policy(pool, &tenant, &policy, None).await? {
                Guarded::Done(()) => println!("deleted {policy}"),
                _ => anyhow::bail!("quota policy {policy:?} of tenant {tenant:?} not found"),
            }
        }
        QuotaCommand::Status {
            tenant,
            agent,
            service,
        } => {
            let selection = Selection::Call {
                agent_id: agent.as_deref(),
                service: service.as_deref(),
            };
            println!("policy\tused\treserved\tremaining\tlimit\twindow_end\tover_limit\tleased");
            for state in status(pool, &tenant, selection).await? {
                println!("{}", status_line(&state));
            }
        }
    }
    Ok(())
}

async fn policy_from(args: CreateArgs, pool: &PgPool) -> anyhow::Result<Policy> {
    let window = Window::parse(&args.window)
        .ok_or_else(|| anyhow::anyhow!("--window: use day, week, month or billing_period"))?;
    let enforcement = Enforcement::parse(&args.enforcement)
        .ok_or_else(|| anyhow::anyhow!("--enforcement: use hard or soft"))?;
    let limit = match (args.tokens, &args.money) {
        (Some(limit), _) => Limit::Tokens {
            limit,
            classes: args
                .classes
                .iter()
                .map(|c| {
                    TokenClass::parse(c.trim())
                        .ok_or_else(|| anyhow::anyhow!("--classes: unknown token class {c:?}"))
                })
                .collect::<anyhow::Result<_>>()?,
        },
        (None, Some(amount)) => Limit::Money {
            amount: parse_plain_decimal(amount, "--money")?,
            currency: store::tenant(pool, &args.tenant).await?.currency,
        },
        (None, None) => anyhow::bail!("give --tokens N or --money AMOUNT"),
    };
    limit.validate("limit")?;
    let now = chrono::Utc::now();
    Ok(Policy {
        tenant_id: args.tenant,
        policy_id: args.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        name: args.name,
        scope: match (args.agent, args.service) {
            (Some(agent), _) => Scope::Agent(agent),
            (None, Some(service)) => Scope::Service(service),
            (None, None) => Scope::Tenant,
        },
        window,
        limit,
        enforcement,
        thresholds_bps: normalize_thresholds(&args.thresholds, "--thresholds")?,
        disabled: false,
        revision: 1,
        created_at: now,
        updated_at: now,
    })
}

fn limit_text(limit: &Limit) -> String {
    match limit {
        Limit::Tokens { limit, classes } if classes.is_empty() => format!("{limit} tokens"),
        Limit::Tokens { limit, classes } => {
            let names: Vec<&str> = classes.iter().map(|c| c.as_str()).collect();
            format!("{limit} tokens ({})", names.join(","))
        }
        Limit::Money { amount, currency } => format!("{amount} {currency}"),
    }
}

fn describe(policy: &Policy) -> String {
    let subject = match &policy.scope {
        Scope::Tenant => format!("tenant {}", policy.tenant_id),
        Scope::Agent(a) => format!("tenant {} agent {a}", policy.tenant_id),
        Scope::Service(s) => format!("tenant {} service {s}", policy.tenant_id),
    };
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\tthresholds {:?}{}",
        policy.policy_id,
        subject,
        policy.window.as_str(),
        limit_text(&policy.limit),
        policy.enforcement.as_str(),
        policy.name,
        policy.thresholds_bps,
        if policy.disabled { "\tdisabled" } else { "" }
    )
}

fn status_line(state: &PolicyState) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        state.policy.policy_id,
        state.used,
        state.reserved,
        state.remaining(),
        limit_text(&state.policy.limit),
        state.window.end.to_rfc3339(),
        state.over_limit,
        state.leased
    )
}
