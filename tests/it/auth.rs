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
/// void, a quota policy, a reservation, a price override that has not taken effect, a key to
/// revoke and a price book version to read.
struct Fixture {
    finalized: String,
    to_void: String,
    policy_id: String,
    reservation_id: String,
    override_id: String,
    revocable_key_id: String,
    book: (String, String),
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
        "StreamUsage" => api
            .usage
            .stream_usage(tokio_stream::iter(vec![pb::StreamUsageRequest {
                events: vec![event(tenant, &unique("e"), 10, 1)],
                omit_accepted_results: false,
            }]))
            .await
            .map(|_| ()),
        "CreateTenant" => api
            .admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: unique("t"),
                    name: "made in the auth test".into(),
                    currency: "USD".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ()),
        "ListTenants" => api
            .admin
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .map(|_| ()),
        "CreateApiKey" => api
            .admin
            .create_api_key(pb::CreateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    name: "made in the auth test".into(),
                    scopes: vec![pb::ApiKeyScope::Admin as i32],
                    binding: Some(pb::api_key::Binding::Tenants(pb::TenantBinding {
                        tenant_ids: vec![tenant.to_owned()],
                    })),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ()),
        "ListApiKeys" => api
            .admin
            .list_api_keys(pb::ListApiKeysRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "RevokeApiKey" => api
            .admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: fixture.revocable_key_id.clone(),
            })
            .await
            .map(|_| ()),
        "CreatePriceBookVersion" => api
            .prices
            .create_price_book_version(pb::CreatePriceBookVersionRequest {
                version: Some(pb::PriceBookVersion {
                    price_book_id: unique("book").to_lowercase(),
                    currency: "USD".into(),
                    effective_from: Some(ts(hour(-24))),
                    rates: vec![pb::Rate {
                        provider: "openai".into(),
                        model: "gpt-4.1-mini".into(),
                        token_class: pb::TokenClass::Input as i32,
                        price_per_million: "0.40".into(),
                        cost_per_million: "0.30".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                allow_backdated: false,
            })
            .await
            .map(|_| ()),
        "GetPriceBookVersion" => api
            .prices
            .get_price_book_version(pb::GetPriceBookVersionRequest {
                price_book_id: fixture.book.0.clone(),
                version_id: fixture.book.1.clone(),
            })
            .await
            .map(|_| ()),
        "ListPriceBookVersions" => api
            .prices
            .list_price_book_versions(pb::ListPriceBookVersionsRequest {
                price_book_id: fixture.book.0.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ListRates" => api
            .prices
            .list_rates(pb::ListRatesRequest {
                tenant_id: tenant.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "DeleteTenantPriceOverride" => api
            .prices
            .delete_tenant_price_override(pb::DeleteTenantPriceOverrideRequest {
                tenant_id: tenant.to_owned(),
                override_id: fixture.override_id.clone(),
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

/// Who may call one RPC.
struct Rule {
    rpc: &'static str,
    /// The scopes that each allow it.
    scopes: &'static [pb::ApiKeyScope],
    /// Whether it needs a key bound to all tenants (shared or cross-tenant resources).
    all_tenants: bool,
    /// What a key with every scope, bound to another tenant, gets: refused, or (for shared
    /// resources, and lists that show only what the key may see) answered.
    foreign: Code,
}

const fn tenant_rpc(rpc: &'static str, scopes: &'static [pb::ApiKeyScope]) -> Rule {
    Rule {
        rpc,
        scopes,
        all_tenants: false,
        foreign: Code::PermissionDenied,
    }
}

/// Every RPC of `tokenmeter.v1`, in the order the matrix calls them.
const RPCS: &[Rule] = &[
    tenant_rpc("IngestUsage", &[Ingest]),
    tenant_rpc("StreamUsage", &[Ingest]),
    tenant_rpc("ValidateUsage", &[Ingest]),
    tenant_rpc("QueryUsage", &[Read]),
    tenant_rpc("GetAttribution", &[Read]),
    // Before CreateTenantPriceOverride, whose discount would overlap the fixture's override.
    tenant_rpc("DeleteTenantPriceOverride", &[Admin]),
    tenant_rpc("CreateTenantPriceOverride", &[Admin]),
    tenant_rpc("ListTenantPriceOverrides", &[Read]),
    tenant_rpc("ListRates", &[Read]),
    Rule {
        rpc: "CreatePriceBookVersion",
        scopes: &[Admin],
        all_tenants: true,
        foreign: Code::PermissionDenied,
    },
    // Price books are shared: any READ key reads them.
    Rule {
        rpc: "GetPriceBookVersion",
        scopes: &[Read],
        all_tenants: false,
        foreign: Code::Ok,
    },
    Rule {
        rpc: "ListPriceBookVersions",
        scopes: &[Read],
        all_tenants: false,
        foreign: Code::Ok,
    },
    Rule {
        rpc: "CreateTenant",
        scopes: &[Admin],
        all_tenants: true,
        foreign: Code::PermissionDenied,
    },
    Rule {
        rpc: "ListTenants",
        scopes: &[Admin],
        all_tenants: true,
        foreign: Code::PermissionDenied,
    },
    tenant_rpc("GetTenant", &[Admin]),
    tenant_rpc("UpdateTenant", &[Admin]),
    tenant_rpc("CreateApiKey", &[Admin]),
    // Lists only the keys within the caller's binding: none of the tenant's for a foreign key.
    Rule {
        rpc: "ListApiKeys",
        scopes: &[Admin],
        all_tenants: false,
        foreign: Code::Ok,
    },
    // A key beyond the caller's binding does not exist for it.
    Rule {
        rpc: "RevokeApiKey",
        scopes: &[Admin],
        all_tenants: false,
        foreign: Code::NotFound,
    },
    // Recorded before it is read.
    tenant_rpc("RecordTransactionEvents", &[Ingest]),
    tenant_rpc("GetTransaction", &[Read]),
    tenant_rpc("ListTransactions", &[Read]),
    tenant_rpc("PreviewInvoice", &[Read]),
    tenant_rpc("ListInvoices", &[Read]),
    tenant_rpc("GetInvoice", &[Read]),
    tenant_rpc("FinalizeInvoice", &[Admin]),
    tenant_rpc("VoidInvoice", &[Admin]),
    tenant_rpc("ClosePeriod", &[Admin]),
    tenant_rpc("CreateQuotaPolicy", &[Admin]),
    tenant_rpc("GetQuotaPolicy", &[Read]),
    tenant_rpc("ListQuotaPolicies", &[Read]),
    tenant_rpc("UpdateQuotaPolicy", &[Admin]),
    tenant_rpc("Reserve", &[Quota]),
    tenant_rpc("Settle", &[Quota]),
    tenant_rpc("Release", &[Quota]),
    tenant_rpc("GetQuotaStatus", &[Quota, Read]),
    tenant_rpc("DeleteQuotaPolicy", &[Admin]),
    tenant_rpc("ExportInvoices", &[Read]),
    tenant_rpc("ExportInvoiceLines", &[Read]),
    tenant_rpc("ExportUsage", &[Read]),
    tenant_rpc("ExportAttribution", &[Read]),
    tenant_rpc("ExportTransactions", &[Read]),
];

/// Every method of the `tokenmeter.v1` services, from the descriptor set the server is built
/// from: an RPC added later without a row in [`RPCS`] fails the matrix.
fn served_rpcs() -> std::collections::BTreeSet<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(tokenmeter::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    set.file
        .iter()
        .filter(|file| file.package() == "tokenmeter.v1")
        .flat_map(|file| file.service.iter())
        .flat_map(|service| service.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

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
    // Tenant a is priced with a book of its own, which ListRates resolves.
    let book = unique("book").to_lowercase();
    let version = admin
        .version(
            &book,
            "USD",
            hour(24),
            &[("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30")],
        )
        .await;
    let a = admin.tenant("USD", "UTC", Some(&book)).await;
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

    let listed: std::collections::BTreeSet<String> =
        RPCS.iter().map(|r| r.rpc.to_owned()).collect();
    assert_eq!(listed.len(), RPCS.len(), "an rpc listed twice");
    assert_eq!(
        listed,
        served_rpcs(),
        "every served rpc has exactly one row"
    );

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
        override_id: admin
            .prices
            .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
                override_rule: Some(pb::TenantPriceOverride {
                    tenant_id: a.clone(),
                    adjustment: Some(pb::tenant_price_override::Adjustment::DiscountPercent(
                        "3".into(),
                    )),
                    effective_from: Some(ts(hour(-48))),
                    ..Default::default()
                }),
                allow_backdated: false,
            })
            .await
            .expect("override")
            .into_inner()
            .override_rule
            .expect("override")
            .override_id,
        revocable_key_id: key(&mut admin, &[Read], &[&a]).await.0,
        book: (book, version.version_id),
    };

    for rule in RPCS {
        let (rpc, scopes) = (rule.rpc, rule.scopes);
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
            ("key of another tenant", Some(of_b.as_str()), rule.foreign),
        ];
        for (case, secret, expected) in cases {
            let mut api = Clients::with_key(channel.clone(), secret);
            assert_eq!(
                call(&mut api, rpc, &a, &fixture).await,
                expected,
                "{rpc} with {case}"
            );
        }
        for scope in scopes {
            let binding: &[&str] = if rule.all_tenants { &[] } else { &[&a] };
            let (_, scoped) = key(&mut admin, &[*scope], binding).await;
            let mut allowed = Clients::with_key(channel.clone(), Some(&scoped));
            assert_eq!(
                call(&mut allowed, rpc, &a, &fixture).await,
                Code::Ok,
                "{rpc} with the {scope:?} scope"
            );
        }
    }

    // Refused calls left nothing behind: only the allowed ingests (unary and streamed),
    // override and lifecycle event exist.
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
    let revoked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE key_id = $1::uuid")
            .bind(&fixture.revocable_key_id)
            .fetch_one(&app.pool)
            .await
            .expect("key");
    // Plus the two usage events behind the invoices of the setup; the allowed create added one
    // policy and the allowed delete removed the fixture's; the fixture's override was removed
    // (it had not taken effect) and the allowed create made one.
    assert_eq!((events, overrides, lifecycle, policies), (2 + 2, 1, 1, 1));
    assert!(revoked.is_some(), "the allowed revoke revoked the key");
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

/// The status code of a call, OK included.
fn code_of<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map_or_else(|status| status.code(), |_| Code::Ok)
}

#[tokio::test]
async fn a_key_of_one_tenant_naming_it_finds_none_of_another_tenants_objects_and_changes_none() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let mut admin = Clients::new(channel.clone());
    let a = admin.tenant("USD", "UTC", None).await;
    let b = admin.tenant("USD", "UTC", None).await;
    // Tenant b's objects: a finalized invoice, a draft, a policy, a reservation, a transaction
    // and a price override.
    let finalized = finalized_invoice(&mut admin, &b, 2).await;
    let mut late = event(&b, &unique("e"), 5, 5);
    late.occurred_at = Some(ts(month(1).start + chrono::Duration::days(3)));
    admin.ingest(vec![late]).await;
    let draft = admin
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: b.clone(),
            period: month(1).label.to_string(),
            currency: String::new(),
        })
        .await
        .expect("preview")
        .into_inner()
        .invoices
        .pop()
        .expect("draft")
        .invoice_id;
    let mut quota = quota_client(channel.clone());
    let policy_id = create(
        &mut quota,
        token_policy(&b, 1000, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;
    let reservation_id = reserve(&mut quota, reserve_request(&b, 7))
        .await
        .reservation_id;
    admin
        .transactions
        .record_transaction_events(pb::RecordTransactionEventsRequest {
            events: vec![crate::transactions::started(&b, "order-of-b", "te-b")],
            omit_accepted_results: false,
        })
        .await
        .expect("transaction of b");
    let override_id = admin
        .prices
        .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
            override_rule: Some(pb::TenantPriceOverride {
                tenant_id: b.clone(),
                adjustment: Some(pb::tenant_price_override::Adjustment::DiscountPercent(
                    "7".into(),
                )),
                effective_from: Some(ts(hour(-48))),
                ..Default::default()
            }),
            allow_backdated: false,
        })
        .await
        .expect("override of b")
        .into_inner()
        .override_rule
        .expect("override")
        .override_id;
    let (_, of_a) = key(&mut admin, &[Ingest, Quota, Read, Admin], &[&a]).await;
    let mut as_a = Clients::with_key(channel.clone(), Some(&of_a));
    let renamed = pb::QuotaPolicy {
        policy_id: policy_id.clone(),
        name: "taken over".into(),
        ..token_policy(&a, 5, pb::QuotaEnforcement::Soft, &[])
    };

    // Every call names tenant a, the key's own, and an object of tenant b.
    let calls = [
        (
            "GetInvoice",
            code_of(
                as_a.invoices
                    .get_invoice(pb::GetInvoiceRequest {
                        tenant_id: a.clone(),
                        invoice_id: finalized.clone(),
                    })
                    .await,
            ),
        ),
        (
            "FinalizeInvoice",
            code_of(
                as_a.invoices
                    .finalize_invoice(pb::FinalizeInvoiceRequest {
                        tenant_id: a.clone(),
                        invoice_id: draft.clone(),
                        ignore_grace_period: true,
                    })
                    .await,
            ),
        ),
        (
            "VoidInvoice",
            code_of(
                as_a.invoices
                    .void_invoice(pb::VoidInvoiceRequest {
                        tenant_id: a.clone(),
                        invoice_id: finalized.clone(),
                        reason: "not yours".into(),
                    })
                    .await,
            ),
        ),
        (
            "GetQuotaPolicy",
            code_of(
                as_a.quota
                    .get_quota_policy(pb::GetQuotaPolicyRequest {
                        tenant_id: a.clone(),
                        policy_id: policy_id.clone(),
                    })
                    .await,
            ),
        ),
        (
            "UpdateQuotaPolicy",
            code_of(
                as_a.quota
                    .update_quota_policy(pb::UpdateQuotaPolicyRequest {
                        policy: Some(renamed),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["name".into()],
                        }),
                        expected_revision: None,
                    })
                    .await,
            ),
        ),
        (
            "DeleteQuotaPolicy",
            code_of(
                as_a.quota
                    .delete_quota_policy(pb::DeleteQuotaPolicyRequest {
                        tenant_id: a.clone(),
                        policy_id: policy_id.clone(),
                        expected_revision: None,
                    })
                    .await,
            ),
        ),
        (
            "Settle",
            code_of(
                as_a.quota
                    .settle(pb::SettleRequest {
                        tenant_id: a.clone(),
                        reservation_id: reservation_id.clone(),
                        actual: Some(pb::settle_request::Actual::ActualTokens(pb::TokenCounts {
                            input: 1,
                            ..Default::default()
                        })),
                    })
                    .await,
            ),
        ),
        (
            "Release",
            code_of(
                as_a.quota
                    .release(pb::ReleaseRequest {
                        tenant_id: a.clone(),
                        reservation_id: reservation_id.clone(),
                    })
                    .await,
            ),
        ),
        (
            "GetTransaction",
            code_of(
                as_a.transactions
                    .get_transaction(pb::GetTransactionRequest {
                        tenant_id: a.clone(),
                        transaction_id: "order-of-b".into(),
                        include_events: true,
                    })
                    .await,
            ),
        ),
        (
            "DeleteTenantPriceOverride",
            code_of(
                as_a.prices
                    .delete_tenant_price_override(pb::DeleteTenantPriceOverrideRequest {
                        tenant_id: a.clone(),
                        override_id: override_id.clone(),
                    })
                    .await,
            ),
        ),
    ];

    for (rpc, code) in calls {
        assert_eq!(code, Code::NotFound, "{rpc} on another tenant's object");
    }
    // Nothing of b's moved.
    let state = |id: &str| {
        let pool = app.pool.clone();
        let id = id.to_owned();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM invoices WHERE invoice_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("invoice")
        }
    };
    assert_eq!(state(&finalized).await, "finalized");
    assert_eq!(state(&draft).await, "draft");
    let policy = admin
        .quota
        .get_quota_policy(pb::GetQuotaPolicyRequest {
            tenant_id: b.clone(),
            policy_id: policy_id.clone(),
        })
        .await
        .expect("b's policy is still there")
        .into_inner()
        .policy
        .expect("policy");
    assert_ne!(policy.name, "taken over");
    let reservation: String = sqlx::query_scalar(
        "SELECT state FROM quota_reservations WHERE tenant_id = $1 AND reservation_id = $2",
    )
    .bind(&b)
    .bind(&reservation_id)
    .fetch_one(&app.pool)
    .await
    .expect("reservation");
    assert_eq!(reservation, "active");
    let overrides: Vec<Option<chrono::DateTime<chrono::Utc>>> = sqlx::query_scalar(
        "SELECT effective_to FROM tenant_price_overrides WHERE override_id = $1",
    )
    .bind(&override_id)
    .fetch_all(&app.pool)
    .await
    .expect("override");
    assert_eq!(
        overrides,
        vec![None],
        "b's override is neither removed nor ended"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn forged_and_truncated_secrets_are_refused_and_a_revoked_key_lapses_within_the_cache_ttl() {
    const TTL: std::time::Duration = std::time::Duration::from_secs(2);
    let app = crate::helpers::spawn_app_with(|s| s.auth.cache_ttl = TTL).await;
    let database = app.pool.connect_options().get_database().map(str::to_owned);
    // A second replica on the same database: it learns of a revocation only through the
    // database, once its cached copy of the key is older than the TTL.
    let other = crate::helpers::spawn_app_with(|s| {
        s.auth.cache_ttl = TTL;
        let mut url = url::Url::parse(&s.database.url).expect("url");
        url.set_path(database.as_deref().expect("database name"));
        s.database.url = url.to_string();
    })
    .await;
    let mut admin = Clients::new(app.channel().await);
    let tenant = admin.tenant("USD", "UTC", None).await;
    let (key_id, secret) = key(&mut admin, &[Read], &[&tenant]).await;
    let read = |secret: String, channel: tonic::transport::Channel, tenant: String| async move {
        let mut api = Clients::with_key(channel, Some(&secret));
        code_of(
            api.transactions
                .list_transactions(pb::ListTransactionsRequest {
                    tenant_id: tenant,
                    ..Default::default()
                })
                .await,
        )
    };
    // The real key works on both replicas, and each now holds it in its cache.
    assert_eq!(
        read(secret.clone(), app.channel().await, tenant.clone()).await,
        Code::Ok
    );
    assert_eq!(
        read(secret.clone(), other.channel().await, tenant.clone()).await,
        Code::Ok
    );

    // The real key's prefix with another secret of the same shape, and the secret cut short:
    // the first reaches the cached key and fails its hash, the second fails the key's shape.
    let (prefix, tail) = secret.rsplit_once('_').expect("tm_<prefix>_<secret>");
    let flipped: String = tail
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let forged = format!("{prefix}_{flipped}");
    let truncated = secret[..secret.len() - 1].to_owned();
    for (case, presented) in [("forged", &forged), ("truncated", &truncated)] {
        for channel in [app.channel().await, other.channel().await] {
            assert_eq!(
                read(presented.clone(), channel, tenant.clone()).await,
                Code::Unauthenticated,
                "{case} secret"
            );
        }
    }

    admin
        .admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_id.clone(),
        })
        .await
        .expect("revoke");
    let revoked_at = std::time::Instant::now();
    // The replica that revoked it forgets it at once, although its copy is fresh.
    assert_eq!(
        read(secret.clone(), app.channel().await, tenant.clone()).await,
        Code::Unauthenticated
    );
    // The other refuses it once its copy is older than the TTL, and from then on.
    let lapsed = loop {
        let code = read(secret.clone(), other.channel().await, tenant.clone()).await;
        if code != Code::Ok {
            break code;
        }
        assert!(
            revoked_at.elapsed() < TTL + std::time::Duration::from_secs(1),
            "a revoked key was accepted past the cache ttl"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(lapsed, Code::Unauthenticated);
    other.stop().await.expect("clean shutdown");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_stream_refuses_a_foreign_tenants_events_and_stops_when_its_key_is_revoked() {
    const TTL: std::time::Duration = std::time::Duration::from_secs(1);
    let app = crate::helpers::spawn_app_with(|s| s.auth.cache_ttl = TTL).await;
    let channel = app.channel().await;
    let mut admin = Clients::new(channel.clone());
    let a = admin.tenant("USD", "UTC", None).await;
    let b = admin.tenant("USD", "UTC", None).await;
    let (_, of_a) = key(&mut admin, &[Ingest], &[&a]).await;
    let mut as_a = Clients::with_key(channel.clone(), Some(&of_a));
    let message = |events| pb::StreamUsageRequest {
        events,
        omit_accepted_results: false,
    };

    // A stream that carries tenant b's event in its second message.
    let mixed = as_a
        .usage
        .stream_usage(tokio_stream::iter(vec![
            message(vec![event(&a, "own-1", 10, 1)]),
            message(vec![
                event(&b, "foreign-1", 20, 2),
                event(&a, "own-2", 30, 3),
            ]),
        ]))
        .await
        .expect_err("a foreign tenant's event refuses the stream");

    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT tenant_id, event_id FROM usage_events ORDER BY event_id")
            .fetch_all(&app.pool)
            .await
            .expect("events");
    assert_eq!(mixed.code(), Code::PermissionDenied);
    // The first message was committed on its own; nothing of the refused message was.
    assert_eq!(stored, vec![(a.clone(), "own-1".to_owned())]);

    // A long stream whose key is revoked (on another replica's watch: the cache keeps a copy
    // of the key, which this replica's revocation clears, so revoke it in the database).
    let (key_id, streaming_key) = key(&mut admin, &[Ingest], &[&a]).await;
    let mut streamer = Clients::with_key(channel.clone(), Some(&streaming_key));
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(async move {
        streamer
            .usage
            .stream_usage(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    sender
        .send(message(vec![event(&a, "before-revoke", 1, 1)]))
        .await
        .expect("send");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1::uuid")
        .bind(&key_id)
        .execute(&app.pool)
        .await
        .expect("revoke in the database");
    tokio::time::sleep(TTL + std::time::Duration::from_millis(300)).await;
    // Sent after the TTL: refused, and the stream ends with it.
    let _ = sender
        .send(message(vec![event(&a, "after-revoke", 1, 1)]))
        .await;
    drop(sender);
    let ended = call
        .await
        .expect("stream task")
        .expect_err("a revoked key's stream is refused");

    assert_eq!(ended.code(), Code::Unauthenticated);
    let later: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE event_id IN ('before-revoke', 'after-revoke')",
    )
    .fetch_one(&app.pool)
    .await
    .expect("events");
    assert_eq!(
        later, 1,
        "only the event sent before the revocation is stored"
    );
    app.stop().await.expect("clean shutdown");
}
