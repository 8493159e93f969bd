//! `logflow replay`: the raw archive and the dead letters back through the stages.

use std::collections::BTreeSet;

use logflow::replay::{ReplayOptions, replay};
use logflow::worker::Clients;
use logflow_integration_tests::{Emulators, unique};

use crate::common::{config_yaml, destinations, load_config, published_stream, run_until_acked};

fn options(pipeline: &str, from: String) -> ReplayOptions {
    ReplayOptions {
        pipeline: pipeline.into(),
        from,
        since: None,
        until: None,
        dead_letters: false,
        dry_run: false,
        table: None,
        checkpoint: None,
        concurrency: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_a_table_from_the_archive_resumably() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let ty = "acme.payments.v1.PaymentEvent";
    let stream = published_stream(&emu, "replay", "pay", ty, 400, 61).await;
    let subscription = stream.subscription.clone();
    let cfg = load_config(&config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = stream.published.len() as u64;
    run_until_acked(cfg.clone(), &clients, total).await;
    let valid: BTreeSet<&str> = stream
        .published
        .iter()
        .filter(|(_, s)| s.malformed.is_none())
        .map(|(id, _)| id.as_str())
        .collect();
    let malformed = total - valid.len() as u64;

    // A dry run reads everything and writes nothing.
    let from = format!("gs://{raw}/raw/{subscription}");
    let dry = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            dry_run: true,
            ..options("pay", from.clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.messages, dry.inserted, dry.dead_lettered),
        (total, valid.len() as u64, malformed),
        "{dry:?}"
    );

    // Backfill a new table from the archive, with a checkpoint; a time window around now
    // exercises the hour-partition listing.
    let dir = std::env::temp_dir().join(unique("logflow-replay"));
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = dir.join("checkpoint");
    let now = logflow_core::time::now_micros();
    let opts = ReplayOptions {
        table: Some(format!("{dataset}.backfill")),
        checkpoint: Some(checkpoint.clone()),
        since: Some(now - 3_600_000_000),
        until: Some(now + 3_600_000_000),
        ..options("pay", from.clone())
    };
    let s = replay(cfg.clone(), clients.clone(), opts.clone())
        .await
        .unwrap();
    assert!(s.ok(), "{s:?}");
    assert!(s.objects > 0 && s.completed == s.objects, "{s:?}");
    assert_eq!(
        (s.messages, s.inserted, s.dead_lettered, s.failed),
        (total, valid.len() as u64, malformed, 0),
        "{s:?}"
    );
    let rows = clients
        .bq
        .query(&format!("SELECT _message_id FROM {dataset}.backfill"))
        .await
        .unwrap();
    let ids: BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r[0].as_ref().and_then(|v| v.as_str()).map(str::to_string))
        .collect();
    assert_eq!(
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        valid
    );
    assert_eq!(rows.len(), valid.len(), "one row per message");

    // Resuming skips everything already done.
    let again = replay(cfg.clone(), clients.clone(), opts).await.unwrap();
    assert_eq!((again.skipped, again.messages), (s.objects, 0), "{again:?}");

    // A window with nothing in it selects nothing.
    let empty = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            since: Some(now + 7_200_000_000),
            until: Some(now + 10_800_000_000),
            dry_run: true,
            ..options("pay", from)
        },
    )
    .await
    .unwrap();
    assert_eq!((empty.objects, empty.messages), (0, 0), "{empty:?}");

    // Dead letters go through the stages again (still malformed, so dead-lettered again). The
    // path holds the original run's dead letters and the backfill's: twice the malformed ones.
    let dead = replay(
        cfg,
        clients,
        ReplayOptions {
            dead_letters: true,
            ..options("pay", format!("gs://{dlq}/dlq/{subscription}"))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            dead.messages,
            dead.inserted,
            dead.dead_lettered,
            dead.failed
        ),
        (2 * malformed, 0, 2 * malformed, 0),
        "{dead:?}"
    );
}
