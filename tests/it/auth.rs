//! Every RPC is authenticated and authorized: no key, a revoked or expired key, a
//! key without the scope, and a key for another tenant each get the right code and leave no
//! trace.

use tokenmeter::proto::v1 as pb;
use tonic::Code;

use crate::billing::month;
use crate::helpers::spawn_app;
use crate::quota::{create, quota_client, reserve, reserve_request, token_policy};
use crate::usage_support::{Clients, event, hour, ts, unique};

/// Issues a key through the API with the admin key.
pub async fn key(
    admin: &mut Clients,
    scopes: &[pb::ApiKeyScope],
    tenants: &[&str],
) -> (String, String) {
    let response = admin
        .admin
        .create_api_key(pb::CreateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                name: "test".into(),
                scopes: scopes.iter().map(|s| *s as i32).collect(),
                binding: Some(if tenants.is_empty() {
                    pb::api_key::Binding::AllTenants(true)
                } else {
                    pb::api_key::Binding::Tenants(pb::TenantBinding {
                        tenant_ids: tenants.iter().map(|t| (*t).to_owned()).collect(),
                    })
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("create key")
        .into_inner();
    (response.api_key.expect("key").key_id, response.secret)
}

/// What the RPCs act on for the tenant under test: one finalized invoice, one finalized to
/// void, a quota policy and a reservation.
struct Fixture {
    finalized: String,
    to_void: String,
    policy_id: String,
    reservation_id: String,
}

/// Calls one RPC for `tenant` and returns its status code.
async fn call(api: &mut Clients, rpc: &str, tenant: &str, fixture: &Fixture) -> Code {
    let policy_id = fixture.policy_id.clone();
    let reservation_id = fixture.reservation_id.clone();
    let result = match rpc {
        "PreviewInvoice" => api
            .invoices
            .preview_invoice(pb::PreviewInvoiceRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ListInvoices" => api
            .invoices
            .list_invoices(pb::ListInvoicesRequest {
                tenant_ids: vec![tenant.to_owned()],
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetInvoice" => api
            .invoices
            .get_invoice(pb::GetInvoiceRequest {
                tenant_id: tenant.to_owned(),
                invoice_id: fixture.finalized.clone(),
            })
            .await
            .map(|_| ()),
        "FinalizeInvoice" => api
            .invoices
            .finalize_invoice(pb::FinalizeInvoiceRequest {
                tenant_id: tenant.to_owned(),
                invoice_id: fixture.finalized.clone(),
                ignore_grace_period: true,
            })
            .await
            .map(|_| ()),
        "VoidInvoice" => api
            .invoices
            .void_invoice(pb::VoidInvoiceRequest {
                tenant_id: tenant.to_owned(),
                invoice_id: fixture.to_void.clone(),
                reason: "auth test".into(),
            })
            .await
            .map(|_| ()),
        "ClosePeriod" => api
            .invoices
            .close_period(pb::ClosePeriodRequest {
                period: month(3).label.to_string(),
                tenant_ids: vec![tenant.to_owned()],
                ignore_grace_period: true,
                dry_run: false,
            })
            .await
            .map(|_| ()),
        "IngestUsage" => api
            .usage
            .ingest_usage(pb::IngestUsageRequest {
                events: vec![event(tenant, &unique("e"), 10, 1)],
                omit_accepted_results: false,
            })
            .await
            .map(|_| ()),
        "ValidateUsage" => api
            .usage
            .validate_usage(pb::ValidateUsageRequest {
                events: vec![event(tenant, "dry", 1, 1)],
            })
            .await
            .map(|_| ()),
        "QueryUsage" => api
            .reports
            .query_usage(pb::QueryUsageRequest {
                tenant_ids: vec![tenant.to_owned()],
                time_range: Some(pb::TimeRange {
                    start: Some(ts(hour(24))),
                    end: Some(ts(hour(0))),
                }),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateTenantPriceOverride" => api
            .prices
            .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
                override_rule: Some(pb::TenantPriceOverride {
                    tenant_id: tenant.to_owned(),
                    adjustment: Some(pb::tenant_price_override::Adjustment::DiscountPercent(
                        "5".into(),
                    )),
                    effective_from: Some(ts(hour(-2))),
                    ..Default::default()
                }),
                allow_backdated: false,
            })
            .await
            .map(|_| ()),
        "ListTenantPriceOverrides" => api
            .prices
            .list_tenant_price_overrides(pb::ListTenantPriceOverridesRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetTenant" => api
            .admin
            .get_tenant(pb::GetTenantRequest {
                tenant_id: tenant.to_owned(),
            })
            .await
            .map(|_| ()),
        "UpdateTenant" => api
            .admin
            .update_tenant(pb::UpdateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: tenant.to_owned(),
                    name: unique("name"),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
            })
            .await
            .map(|_| ()),
        "GetAttribution" => api
            .reports
            .get_attribution(pb::GetAttributionRequest {
                tenant_ids: vec![tenant.to_owned()],
                time_range: Some(pb::TimeRange {
                    start: Some(ts(hour(24))),
                    end: Some(ts(hour(0))),
                }),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "RecordTransactionEvents" => api
            .transactions
            .record_transaction_events(pb::RecordTransactionEventsRequest {
                events: vec![crate::transactions::started(
                    tenant,
                    "auth-order",
                    &unique("te"),
                )],
                omit_accepted_results: false,
            })
            .await
            .map(|_| ()),
        "GetTransaction" => api
            .transactions
            .get_transaction(pb::GetTransactionRequest {
                tenant_id: tenant.to_owned(),
                transaction_id: "auth-order".to_owned(),
                include_events: true,
            })
            .await
            .map(|_| ()),
        "ListTransactions" => api
            .transactions
            .list_transactions(pb::ListTransactionsRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateQuotaPolicy" => api
            .quota
            .create_quota_policy(pb::CreateQuotaPolicyRequest {
                policy: Some(token_policy(tenant, 10, pb::QuotaEnforcement::Soft, &[])),
            })
            .await
            .map(|_| ()),
        "GetQuotaPolicy" => api
            .quota
            .get_quota_policy(pb::GetQuotaPolicyRequest {
                tenant_id: tenant.to_owned(),
                policy_id,
            })
            .await
            .map(|_| ()),
        "ListQuotaPolicies" => api
            .quota
            .list_quota_policies(pb::ListQuotaPoliciesRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "UpdateQuotaPolicy" => api
            .quota
            .update_quota_policy(pb::UpdateQuotaPolicyRequest {
                policy: Some(pb::QuotaPolicy {
                    policy_id,
                    name: "renamed".into(),
                    ..token_policy(tenant, 10, pb::QuotaEnforcement::Hard, &[])
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                expected_revision: None,
            })
            .await
            .map(|_| ()),
        "Reserve" => api
            .quota
            .reserve(reserve_request(tenant, 1))
            .await
            .map(|_| ()),
        "Settle" => api
            .quota
            .settle(pb::SettleRequest {
                tenant_id: tenant.to_owned(),
                reservation_id,
                actual: Some(pb::settle_request::Actual::ActualTokens(pb::TokenCounts {
                    input: 1,
                    ..Default::default()
                })),
            })
            .await
            .map(|_| ()),
        "Release" => api
            .quota
            .release(pb::ReleaseRequest {
                tenant_id: tenant.to_owned(),
                reservation_id,
            })
            .await
            .map(|_| ()),
        "GetQuotaStatus" => api
            .quota
            .get_quota_status(pb::GetQuotaStatusRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        // Last: the policy the others use goes away.
        "DeleteQuotaPolicy" => api
            .quota
            .delete_quota_policy(pb::DeleteQuotaPolicyRequest {
                tenant_id: tenant.to_owned(),
                policy_id,
                expected_revision: None,
            })
            .await
            .map(|_| ()),
        "ExportInvoices" => {
            drain(
                api.exports
                    .export_invoices(pb::ExportInvoicesRequest {
                        selection: Some(export_selection(tenant)),
                        states: vec![],
                    })
                    .await,
            )
            .await
        }
        "ExportInvoiceLines" => {
            drain(
                api.exports
                    .export_invoice_lines(pb::ExportInvoiceLinesRequest {
                        selection: Some(export_selection(tenant)),
                        states: vec![],
                    })
                    .await,
            )
            .await
        }
        "ExportUsage" => {
            drain(
                api.exports
                    .export_usage(pb::ExportUsageRequest {
                        selection: Some(export_selection(tenant)),
                        ..Default::default()
                    })
                    .await,
            )
            .await
        }
        "ExportAttribution" => {
            drain(
                api.exports
                    .export_attribution(pb::ExportAttributionRequest {
                        selection: Some(export_selection(tenant)),
                        ..Default::default()
                    })
                    .await,
            )
            .await
        }
        "ExportTransactions" => {
            drain(
                api.exports
                    .export_transactions(pb::ExportTransactionsRequest {
                        selection: Some(export_selection(tenant)),
                        lifecycle_events: false,
                    })
                    .await,
            )
            .await
        }
        other => panic!("unknown rpc {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Last month of `tenant`, as CSV.
fn export_selection(tenant: &str) -> pb::ExportSelection {
    pb::ExportSelection {
        range: Some(pb::export_selection::Range::Period(
            month(1).label.to_string(),
        )),
        tenant_ids: vec![tenant.to_owned()],
        format: pb::ExportFormat::Csv as i32,
        ..Default::default()
    }
}

/// Reads an export stream to its end: a refusal may come as the call's status or in the stream.
async fn drain(
    response: Result<tonic::Response<tonic::Streaming<pb::ExportResponse>>, tonic::Status>,
) -> Result<(), tonic::Status> {
    let mut stream = response?.into_inner();
    let mut manifest = false;
    while let Some(message) = stream.message().await? {
        manifest = matches!(
            message.payload,
            Some(pb::export_response::Payload::Manifest(_))
        );
    }
    assert!(
        manifest,
        "an export stream that ends OK ends with its manifest"
    );
    Ok(())
}

use pb::ApiKeyScope::{Admin, Ingest, Quota, Read};

/// (rpc, the scopes that each allow it)
const RPCS: &[(&str, &[pb::ApiKeyScope])] = &[
    ("IngestUsage", &[Ingest]),
    ("ValidateUsage", &[Ingest]),
    ("QueryUsage", &[Read]),
    ("GetAttribution", &[Read]),
    ("CreateTenantPriceOverride", &[Admin]),
    ("ListTenantPriceOverrides", &[Read]),
    ("GetTenant", &[Admin]),
    ("UpdateTenant", &[Admin]),
    // Recorded before it is read.
    ("RecordTransactionEvents", &[Ingest]),
    ("GetTransaction", &[Read]),
    ("ListTransactions", &[Read]),
    ("PreviewInvoice", &[Read]),
    ("ListInvoices", &[Read]),
    ("GetInvoice", &[Read]),
    ("FinalizeInvoice", &[Admin]),
    ("VoidInvoice", &[Admin]),
    ("ClosePeriod", &[Admin]),
    ("CreateQuotaPolicy", &[Admin]),
    ("GetQuotaPolicy", &[Read]),
    ("ListQuotaPolicies", &[Read]),
    ("UpdateQuotaPolicy", &[Admin]),
    ("Reserve", &[Quota]),
    ("Settle", &[Quota]),
    ("Release", &[Quota]),
    ("GetQuotaStatus", &[Quota, Read]),
    ("DeleteQuotaPolicy", &[Admin]),
    ("ExportInvoices", &[Read]),
    ("ExportInvoiceLines", &[Read]),
    ("ExportUsage", &[Read]),
    ("ExportAttribution", &[Read]),
    ("ExportTransactions", &[Read]),
];

/// Finalizes an invoice of `tenant` for the month `months_ago` back (with one event in it).
async fn finalized_invoice(admin: &mut Clients, tenant: &str, months_ago: u32) -> String {
    let period = month(months_ago);
    let mut late = event(tenant, &unique("e"), 5, 5);
    late.occurred_at = Some(ts(period.start + chrono::Duration::days(2)));
    admin.ingest(vec![late]).await;
    admin
        .invoices
        .close_period(pb::ClosePeriodRequest {
            period: period.label.to_string(),
            tenant_ids: vec![tenant.to_owned()],
            ignore_grace_period: true,
            dry_run: false,
        })
        .await
        .expect("close");
    admin
        .invoices
        .list_invoices(pb::ListInvoicesRequest {
            tenant_ids: vec![tenant.to_owned()],
            period: period.label.to_string(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .invoices
        .pop()
        .expect("finalized invoice")
        .invoice_id
}

#[tokio::test]
async fn every_rpc_refuses_missing_revoked_expired_unscoped_and_foreign_keys() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let mut admin = Clients::new(channel.clone());
    let a = admin.tenant("USD", "UTC", None).await;
    let b = admin.tenant("USD", "UTC", None).await;
    let all_scopes = [
        pb::ApiKeyScope::Ingest,
        pb::ApiKeyScope::Quota,
        pb::ApiKeyScope::Read,
        pb::ApiKeyScope::Admin,
    ];
    let (_, of_b) = key(&mut admin, &all_scopes, &[&b]).await;
    let (revoked_id, revoked) = key(&mut admin, &all_scopes, &[&a]).await;
    admin
        .admin
        .revoke_api_key(pb::RevokeApiKeyRequest { key_id: revoked_id })
        .await
        .expect("revoke");
    let (expired_id, expired) = key(&mut admin, &all_scopes, &[&a]).await;
    sqlx::query(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE key_id = $1::uuid",
    )
    .bind(&expired_id)
    .execute(&app.pool)
    .await
    .expect("expire key");

    let mut quota = quota_client(channel.clone());
    let fixture = Fixture {
        finalized: finalized_invoice(&mut admin, &a, 1).await,
        to_void: finalized_invoice(&mut admin, &a, 2).await,
        policy_id: create(
            &mut quota,
            token_policy(&a, 1000, pb::QuotaEnforcement::Hard, &[]),
        )
        .await,
        reservation_id: reserve(&mut quota, reserve_request(&a, 5))
            .await
            .reservation_id,
    };

    for (rpc, scopes) in RPCS {
        let others: Vec<pb::ApiKeyScope> = all_scopes
            .iter()
            .copied()
            .filter(|s| !scopes.contains(s))
            .collect();
        let (_, unscoped) = key(&mut admin, &others, &[&a]).await;
        let cases = [
            ("no key", None, Code::Unauthenticated),
            ("malformed key", Some("tm_nothing"), Code::Unauthenticated),
            ("revoked key", Some(revoked.as_str()), Code::Unauthenticated),
            ("expired key", Some(expired.as_str()), Code::Unauthenticated),
            (
                "key without the scope",
                Some(unscoped.as_str()),
                Code::PermissionDenied,
            ),
            (
                "key of another tenant",
                Some(of_b.as_str()),
                Code::PermissionDenied,
            ),
        ];
        for (case, secret, expected) in cases {
            let mut api = Clients::with_key(channel.clone(), secret);
            assert_eq!(
                call(&mut api, rpc, &a, &fixture).await,
                expected,
                "{rpc} with {case}"
            );
        }
        for scope in *scopes {
            let (_, scoped) = key(&mut admin, &[*scope], &[&a]).await;
            let mut allowed = Clients::with_key(channel.clone(), Some(&scoped));
            assert_eq!(
                call(&mut allowed, rpc, &a, &fixture).await,
                Code::Ok,
                "{rpc} with the {scope:?} scope"
            );
        }
    }

    // Refused calls left nothing behind: only the allowed ingest, override and lifecycle
    // event exist.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(&a)
        .fetch_one(&app.pool)
        .await
        .expect("count");
    let overrides: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tenant_price_overrides WHERE tenant_id = $1")
            .bind(&a)
            .fetch_one(&app.pool)
            .await
            .expect("count");
    let lifecycle: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transaction_events WHERE tenant_id = $1")
            .bind(&a)
            .fetch_one(&app.pool)
            .await
            .expect("count");
    let policies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM quota_policies WHERE tenant_id = $1")
            .bind(&a)
            .fetch_one(&app.pool)
            .await
            .expect("count");
    // Plus the two usage events behind the invoices of the setup; the allowed create added one
    // policy and the allowed delete removed the fixture's.
    assert_eq!((events, overrides, lifecycle, policies), (1 + 2, 1, 1, 1));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_tenant_bound_key_reads_only_its_tenants_and_issues_only_within_its_power() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let mut admin = Clients::new(channel.clone());
    let a = admin.tenant("USD", "UTC", None).await;
    let b = admin.tenant("USD", "UTC", None).await;
    admin.ingest(vec![event(&a, "ea", 10, 0)]).await;
    admin.ingest(vec![event(&b, "eb", 20, 0)]).await;
    let (_, reader_a) = key(
        &mut admin,
        &[pb::ApiKeyScope::Read, pb::ApiKeyScope::Admin],
        &[&a],
    )
    .await;
    let mut as_a = Clients::with_key(channel.clone(), Some(&reader_a));

    // No tenant named: the key's own tenants only.
    let rows = as_a
        .query(pb::QueryUsageRequest {
            time_range: Some(pb::TimeRange {
                start: Some(ts(hour(48))),
                end: Some(ts(hour(-1))),
            }),
            group_by: vec![pb::UsageDimension::Tenant as i32],
            ..Default::default()
        })
        .await;
    let escalate = as_a
        .admin
        .create_api_key(pb::CreateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                scopes: vec![pb::ApiKeyScope::Ingest as i32],
                binding: Some(pb::api_key::Binding::Tenants(pb::TenantBinding {
                    tenant_ids: vec![a.clone()],
                })),
                ..Default::default()
            }),
        })
        .await
        .expect_err("no ingest scope to give");
    let widen = as_a
        .admin
        .create_api_key(pb::CreateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                scopes: vec![pb::ApiKeyScope::Read as i32],
                binding: Some(pb::api_key::Binding::AllTenants(true)),
                ..Default::default()
            }),
        })
        .await
        .expect_err("cannot reach beyond tenant a");

    assert_eq!(
        rows.iter()
            .map(|r| (r.tenant_id.clone(), r.total_tokens))
            .collect::<Vec<_>>(),
        vec![(Some(a.clone()), 10)]
    );
    assert_eq!(escalate.code(), Code::PermissionDenied);
    assert_eq!(widen.code(), Code::PermissionDenied);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn settling_with_a_usage_event_takes_the_ingest_scope_as_well_as_quota() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let mut admin = Clients::new(channel.clone());
    let tenant = admin.tenant("USD", "UTC", None).await;
    let mut quota = quota_client(channel.clone());
    create(
        &mut quota,
        token_policy(&tenant, 1000, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;
    let (_, quota_only) = key(&mut admin, &[pb::ApiKeyScope::Quota], &[&tenant]).await;
    let (_, gateway) = key(
        &mut admin,
        &[pb::ApiKeyScope::Ingest, pb::ApiKeyScope::Quota],
        &[&tenant],
    )
    .await;
    let settle = |reservation_id: String, event_id: &str| pb::SettleRequest {
        tenant_id: tenant.clone(),
        reservation_id,
        actual: Some(pb::settle_request::Actual::UsageEvent(event(
            &tenant, event_id, 7, 3,
        ))),
    };

    let mut with_quota_only = Clients::with_key(channel.clone(), Some(&quota_only));
    let held = reserve(&mut quota, reserve_request(&tenant, 10)).await;
    let refused = with_quota_only
        .quota
        .settle(settle(held.reservation_id.clone(), "refused"))
        .await
        .expect_err("a quota-only key writes no usage");
    let by_counts = with_quota_only
        .quota
        .settle(pb::SettleRequest {
            tenant_id: tenant.clone(),
            reservation_id: held.reservation_id,
            actual: Some(pb::settle_request::Actual::ActualTokens(pb::TokenCounts {
                input: 10,
                ..Default::default()
            })),
        })
        .await;
    let mut with_both = Clients::with_key(channel, Some(&gateway));
    let held = reserve(&mut quota, reserve_request(&tenant, 10)).await;
    let by_event = with_both
        .quota
        .settle(settle(held.reservation_id, "accepted"))
        .await;
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM usage_events WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_all(&app.pool)
            .await
            .expect("stored events");

    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("ingest"), "{refused:?}");
    assert!(by_counts.is_ok(), "{by_counts:?}");
    assert!(by_event.is_ok(), "{by_event:?}");
    assert_eq!(stored, ["accepted"]);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn keys_are_stored_only_as_hashes() {
    let app = spawn_app().await;
    let mut admin = Clients::new(app.channel().await);
    let tenant = admin.tenant("USD", "UTC", None).await;

    let (key_id, secret) = key(&mut admin, &[pb::ApiKeyScope::Read], &[&tenant]).await;

    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(k)::text FROM api_keys k
         UNION ALL SELECT row_to_json(t)::text FROM api_key_tenants t",
    )
    .fetch_all(&app.pool)
    .await
    .expect("rows");
    let secret_part = secret.rsplit('_').next().expect("secret part");
    assert!(stored.iter().any(|row| row.contains(&key_id)));
    assert!(
        stored
            .iter()
            .all(|row| !row.contains(&secret) && !row.contains(secret_part)),
        "{stored:?}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn keys_never_reach_the_logs_even_at_debug_level() {
    let url = crate::helpers::create_database().await;
    let mut server =
        crate::helpers::spawn_serve(&url, &[("TOKENMETER_LOG__FILTER", "debug")]).await;
    let logs = server.logs();
    let channel = server.channel().await;
    let mut admin = Clients::new(channel.clone());
    let tenant = admin.tenant("USD", "UTC", None).await;
    let (key_id, secret) = key(&mut admin, &[pb::ApiKeyScope::Ingest], &[&tenant]).await;
    let mut user = Clients::with_key(channel.clone(), Some(&secret));
    let accepted = user.ingest(vec![event(&tenant, "logged-call", 3, 1)]).await;
    assert_eq!(accepted.summary.expect("summary").accepted, 1);
    let forged = format!("{}_{}", &secret[..secret.len() - 4], "0000");
    let mut intruder = Clients::with_key(channel, Some(&forged));
    let refused = intruder
        .usage
        .ingest_usage(pb::IngestUsageRequest {
            events: vec![event(&tenant, "forged-call", 1, 1)],
            omit_accepted_results: false,
        })
        .await
        .expect_err("forged key");
    assert_eq!(refused.code(), Code::Unauthenticated);
    admin
        .admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_id.clone(),
        })
        .await
        .expect("revoke");

    server.child().kill().expect("stop");
    server.child().wait().expect("reap");
    let logs = logs.join().expect("log reader");
    assert!(
        logs.contains("grpc listening") && logs.lines().count() > 5,
        "debug logs were captured"
    );
    let secret_part = secret.rsplit('_').next().expect("secret part");
    for (what, needle) in [
        ("bootstrap admin key", crate::helpers::ADMIN_KEY),
        ("issued key", secret.as_str()),
        ("issued key's secret part", secret_part),
        ("forged key", forged.as_str()),
    ] {
        assert!(!logs.contains(needle), "the {what} appears in the logs");
    }
}
