//! kill -9 of the server in the middle of ingest: nothing acknowledged is lost, and resending
//! everything afterwards counts every event exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::usage_service_client::UsageServiceClient;

use crate::helpers::{assert_rollups_equal_raw, create_database, spawn_serve};
use crate::usage_support::{Clients, event, unique};

const BATCH: usize = 50;

fn batch(tenant: &str, n: usize) -> Vec<pb::UsageEvent> {
    (0..BATCH)
        .map(|i| {
            let k = n * BATCH + i;
            event(
                tenant,
                &format!("e{k}"),
                i64::try_from(k + 1).expect("k"),
                1,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_killed_server_loses_nothing_it_acknowledged_and_counts_nothing_twice() {
    let url = create_database().await;
    let tenant = unique("t");
    let mut server = spawn_serve(&url, &[]).await;
    let endpoint = format!("http://127.0.0.1:{}", server.grpc_port);

    // Four writers send distinct batches until the server dies under them.
    let acknowledged: Arc<Mutex<Vec<usize>>> = Arc::default();
    let attempted: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut writers = Vec::new();
    for worker in 0..4usize {
        let (endpoint, tenant) = (endpoint.clone(), tenant.clone());
        let (acknowledged, attempted) = (acknowledged.clone(), attempted.clone());
        writers.push(tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(endpoint)
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let mut client =
                UsageServiceClient::new(crate::helpers::authed(channel, crate::helpers::ADMIN_KEY));
            for round in 0.. {
                let n = round * 4 + worker;
                attempted.lock().expect("lock").push(n);
                let request = pb::IngestUsageRequest {
                    events: batch(&tenant, n),
                    omit_accepted_results: true,
                };
                match client.ingest_usage(request).await {
                    Ok(response) => {
                        let summary = response.into_inner().summary.expect("summary");
                        assert_eq!(summary.accepted, i64::try_from(BATCH).expect("batch"));
                        acknowledged.lock().expect("lock").push(n);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child().kill().expect("kill -9");
    server.child().wait().expect("reap");
    for writer in writers {
        writer.await.expect("writer");
    }

    let acknowledged = acknowledged.lock().expect("lock").clone();
    let attempted = attempted.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= 4,
        "the server acknowledged too little to test: {}",
        acknowledged.len()
    );
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM usage_events WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_all(&pool)
            .await
            .expect("stored ids");
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    for n in &acknowledged {
        for e in batch(&tenant, *n) {
            assert!(
                stored.contains(&e.event_id),
                "acknowledged {} was lost",
                e.event_id
            );
        }
    }

    // Restart and resend every batch that was attempted, acknowledged or not.
    let restarted = spawn_serve(&url, &[]).await;
    let channel = restarted.channel().await;
    let mut api = Clients::new(channel);
    let mut accepted = 0;
    let mut duplicate = 0;
    for n in &attempted {
        let summary = api
            .ingest(batch(&tenant, *n))
            .await
            .summary
            .expect("summary");
        accepted += summary.accepted;
        duplicate += summary.duplicate;
    }

    let events = i64::try_from(attempted.len() * BATCH).expect("count");
    assert_eq!(accepted + duplicate, events);
    assert_eq!(
        duplicate,
        i64::try_from(stored.len()).expect("len"),
        "only what was stored is a duplicate"
    );
    let expected_input: i64 = attempted
        .iter()
        .flat_map(|n| batch(&tenant, *n))
        .map(|e| match e.usage {
            Some(pb::usage_event::Usage::Tokens(t)) => t.input,
            _ => 0,
        })
        .sum();
    let rows = api.usage(&tenant, &[]).await;
    assert_eq!(rows[0].event_count, events);
    assert_eq!(rows[0].tokens.expect("tokens").input, expected_input);
    assert_rollups_equal_raw(&pool).await;
    let mut restarted = restarted;
    restarted.child().kill().expect("stop");
    restarted.child().wait().expect("reap");
    pool.close().await;
}
