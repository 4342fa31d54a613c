//! `tokenmeter demo` against a running server: it succeeds twice in a row, and every figure it
//! prints is what the server reports when asked independently — the attribution rows against
//! GetAttribution and against the transactions read back one by one, the invoice against
//! PreviewInvoice.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use tokenmeter::demo::{display_amount, display_percent};
use tokenmeter::proto::v1 as pb;

use crate::helpers::{ADMIN_KEY, spawn_app, tokenmeter_command};
use crate::usage_support::Clients;

const TENANTS: [&str; 3] = ["demo-acme", "demo-globex", "demo-initech"];
const TRANSACTIONS_PER_RUN: usize = 30;

async fn run_demo(grpc_url: String) -> String {
    let output = tokio::task::spawn_blocking(move || {
        tokenmeter_command()
            .args(["demo", "--grpc-url", &grpc_url, "--seed", "7"])
            .args(["--transactions", &TRANSACTIONS_PER_RUN.to_string()])
            .env("TOKENMETER_API_KEY", ADMIN_KEY)
            .output()
            .expect("run tokenmeter demo")
    })
    .await
    .expect("demo task");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The rows of the table printed under the line starting with `title` (after its header and
/// rule), split on whitespace, up to the first blank, footnote or totals line.
fn printed_rows<'a>(stdout: &'a str, title: &str) -> Vec<Vec<&'a str>> {
    stdout
        .lines()
        .skip_while(|line| !line.starts_with(title))
        .skip(3)
        .take_while(|line| {
            !line.is_empty() && !line.starts_with('(') && !line.starts_with("subtotal")
        })
        .map(|line| line.split_whitespace().collect())
        .collect()
}

fn decimal(text: &str) -> Decimal {
    text.parse().expect("decimal string")
}

fn tokens(text: &str) -> i64 {
    text.replace(',', "").parse().expect("token count")
}

/// Σ per (agent, service, currency) of the tenant's transactions as ListTransactions returns
/// them: (completed, failed, refunded, net revenue); `all`/`all` holds the tenant's total.
type Ledger = BTreeMap<(String, String, String), (i64, i64, i64, Decimal)>;

async fn ledger(api: &mut Clients, tenant: &str, currency: &str) -> (Ledger, usize) {
    let mut ledger = Ledger::new();
    let mut page_token = String::new();
    let mut count = 0;
    loop {
        let page = api
            .transactions
            .list_transactions(pb::ListTransactionsRequest {
                tenant_id: tenant.to_owned(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list transactions")
            .into_inner();
        for transaction in &page.transactions {
            count += 1;
            let state = transaction.state();
            let net = transaction
                .net_revenue
                .as_ref()
                .map(|m| decimal(&m.amount))
                .unwrap_or_default();
            let completed = matches!(
                state,
                pb::TransactionState::Completed | pb::TransactionState::Refunded
            );
            let figures = (
                i64::from(completed),
                i64::from(state == pb::TransactionState::Failed),
                i64::from(state == pb::TransactionState::Refunded),
                net,
            );
            for key in [
                (
                    transaction.agent_id.clone(),
                    transaction.service.clone(),
                    currency.to_owned(),
                ),
                ("all".to_owned(), "all".to_owned(), currency.to_owned()),
            ] {
                let entry = ledger.entry(key).or_default();
                entry.0 += figures.0;
                entry.1 += figures.1;
                entry.2 += figures.2;
                entry.3 += figures.3;
            }
        }
        if page.next_page_token.is_empty() {
            return (ledger, count);
        }
        page_token = page.next_page_token;
    }
}

/// The tenant's draft invoice of the current period.
async fn preview(api: &mut Clients, tenant: &str) -> pb::Invoice {
    let mut invoices = api
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: tenant.to_owned(),
            ..Default::default()
        })
        .await
        .expect("preview")
        .into_inner()
        .invoices;
    assert_eq!(invoices.len(), 1, "{tenant}: one currency, one draft");
    invoices.remove(0)
}

#[tokio::test]
async fn the_demo_runs_twice_and_prints_what_the_server_reports() {
    let app = spawn_app().await;
    run_demo(app.grpc_url()).await;
    let stdout = run_demo(app.grpc_url()).await;
    let mut api = Clients::new(app.channel().await);

    // The attribution table, row by row, against GetAttribution over each tenant's period.
    let printed = printed_rows(&stdout, "Attribution by agent x service");
    let mut compared = 0;
    let mut currencies = std::collections::BTreeSet::new();
    let (mut failed, mut refunded, mut unattributed) = (0, 0, Decimal::ZERO);
    for tenant in TENANTS {
        let invoice = preview(&mut api, tenant).await;
        let period = invoice.period.expect("period");
        let mut server = Vec::new();
        for group_by in [
            vec![
                pb::AttributionDimension::Agent as i32,
                pb::AttributionDimension::Service as i32,
            ],
            vec![],
        ] {
            server.extend(
                api.reports
                    .get_attribution(pb::GetAttributionRequest {
                        tenant_ids: vec![tenant.to_owned()],
                        time_range: Some(pb::TimeRange {
                            start: period.start,
                            end: period.end,
                        }),
                        window: pb::TimeBucket::None as i32,
                        group_by,
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .expect("attribution")
                    .into_inner()
                    .rows,
            );
        }
        let rows: Vec<&Vec<&str>> = printed.iter().filter(|r| r[0] == tenant).collect();
        assert_eq!(rows.len(), server.len(), "{tenant}: {stdout}");
        let (ledger, transactions) = ledger(&mut api, tenant, &invoice.currency).await;
        assert_eq!(transactions, 2 * TRANSACTIONS_PER_RUN, "{tenant}");

        for row in rows {
            let [
                _,
                agent,
                service,
                currency,
                done,
                failed_n,
                refunded_n,
                net,
                total_tokens,
                spend,
                cost,
                margin,
                ratio,
                stray,
            ] = row[..]
            else {
                panic!("unexpected row shape: {row:?}");
            };
            let expected = server
                .iter()
                .find(|r| {
                    r.agent_id.as_deref().unwrap_or("all") == agent
                        && r.service.as_deref().unwrap_or("all") == service
                        && r.currency == currency
                })
                .unwrap_or_else(|| panic!("{tenant} {agent} {service} {currency} not reported"));
            assert_eq!(
                (done, failed_n, refunded_n, net, tokens(total_tokens)),
                (
                    expected.transactions_completed.to_string().as_str(),
                    expected.transactions_failed.to_string().as_str(),
                    expected.transactions_refunded.to_string().as_str(),
                    expected.net_revenue.as_str(),
                    expected.total_tokens
                ),
                "{row:?}"
            );
            for (shown, exact) in [
                (spend, &expected.spend),
                (cost, &expected.cost),
                (margin, &expected.gross_margin),
                (stray, &expected.unattributed_spend),
            ] {
                assert_eq!(shown, display_amount(exact).expect("amount"), "{row:?}");
            }
            let expected_ratio = match &expected.spend_to_revenue {
                Some(r) => display_percent(r).expect("ratio"),
                None => "-".to_owned(),
            };
            assert_eq!(ratio, expected_ratio, "{row:?}");

            // The same counts and net revenue, from the transactions read back one by one.
            let key = (agent.to_owned(), service.to_owned(), currency.to_owned());
            let (l_done, l_failed, l_refunded, l_net) =
                ledger.get(&key).copied().unwrap_or_default();
            assert_eq!(
                (
                    tokens(done),
                    tokens(failed_n),
                    tokens(refunded_n),
                    decimal(net)
                ),
                (l_done, l_failed, l_refunded, l_net),
                "{tenant} {key:?}"
            );
            compared += 1;
            currencies.insert(currency.to_owned());
            if agent == "all" {
                failed += tokens(failed_n);
                refunded += tokens(refunded_n);
                unattributed += decimal(stray);
            }
        }
    }
    assert!(compared >= 8, "{stdout}");
    assert_eq!(currencies.into_iter().collect::<Vec<_>>(), ["EUR", "USD"]);
    assert!(failed > 0 && refunded > 0, "{stdout}");
    assert!(unattributed > Decimal::ZERO, "{stdout}");

    // The invoice, line by line, against PreviewInvoice.
    let invoice = preview(&mut api, "demo-acme").await;
    let lines = printed_rows(&stdout, "Draft invoice of demo-acme");
    assert_eq!(lines.len(), invoice.lines.len(), "{stdout}");
    assert!(lines.len() > 4, "{stdout}");
    for (printed, line) in lines.iter().zip(&invoice.lines) {
        assert_eq!(
            printed.last().copied(),
            Some(line.amount.as_str()),
            "{printed:?}"
        );
    }
    let total = stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("total line");
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["total", invoice.total.as_str(), "USD"]
    );
    assert!(decimal(&invoice.total) > Decimal::ZERO);
    app.stop().await.expect("clean stop");
}
