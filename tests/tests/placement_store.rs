//! The `PlacementStore` conformance suite: every test runs on the in-memory store and on a real etcd server
//! (started on free ports in a temporary directory), so that the two stay interchangeable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_e2e::EtcdServer;
use moe_placement::controller::{self, ControllerOptions};
use moe_placement::{
    Cluster, EtcdStore, Expect, Member, MemoryStore, ModelShape, PlacementStore, RequestKind, Role, Session, StoreError,
};

/// The store under test; keeps the etcd server alive as long as the store is used.
struct Subject {
    store: Arc<dyn PlacementStore>,
    _etcd: Option<EtcdServer>,
}

async fn memory() -> Subject {
    Subject { store: Arc::new(MemoryStore::new()), _etcd: None }
}

async fn etcd() -> Subject {
    let server = EtcdServer::start().expect("etcd starts");
    let store = EtcdStore::connect(&[server.endpoint().to_owned()], Duration::from_secs(5)).await.expect("connects");
    Subject { store: Arc::new(store), _etcd: Some(server) }
}

/// Runs `$body(store)` as one test per store.
macro_rules! conformance {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                let s = super::memory().await;
                ($body)(s.store.clone()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                let s = super::etcd().await;
                ($body)(s.store.clone()).await;
            }
        }
    };
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn keys(store: &Arc<dyn PlacementStore>, prefix: &str) -> Vec<String> {
    store.get_prefix(prefix).await.expect("get").into_iter().map(|(k, _)| k).collect()
}

conformance!(put_get_delete_by_prefix, |store: Arc<dyn PlacementStore>| async move {
    store.put("/t/a/1", b"one".to_vec(), None).await.expect("put");
    store.put("/t/a/2", b"two".to_vec(), None).await.expect("put");
    store.put("/t/b", b"other".to_vec(), None).await.expect("put");
    let got = store.get_prefix("/t/a/").await.expect("get");
    assert_eq!(got, vec![("/t/a/1".to_owned(), b"one".to_vec()), ("/t/a/2".to_owned(), b"two".to_vec())]);
    store.put("/t/a/1", b"uno".to_vec(), None).await.expect("overwrite");
    store.delete("/t/a/2").await.expect("delete");
    store.delete("/t/a/missing").await.expect("deleting a missing key is not an error");
    assert_eq!(store.get_prefix("/t/a/").await.expect("get"), vec![("/t/a/1".to_owned(), b"uno".to_vec())]);
});

conformance!(compare_and_put_is_exclusive, |store: Arc<dyn PlacementStore>| async move {
    assert!(store.compare_and_put("/c/k", Expect::Absent, b"v1".to_vec(), None).await.expect("cas"));
    assert!(!store.compare_and_put("/c/k", Expect::Absent, b"v2".to_vec(), None).await.expect("cas"), "key exists");
    assert!(!store.compare_and_put("/c/k", Expect::Value(b"v0"), b"v2".to_vec(), None).await.expect("cas"));
    assert!(store.compare_and_put("/c/k", Expect::Value(b"v1"), b"v2".to_vec(), None).await.expect("cas"));
    assert!(!store.compare_and_put("/c/none", Expect::Value(b"v1"), b"x".to_vec(), None).await.expect("cas"));
    assert!(!store.compare_and_delete("/c/k", b"v1").await.expect("cad"), "stale value");
    assert!(store.compare_and_delete("/c/k", b"v2").await.expect("cad"));
    assert!(keys(&store, "/c/").await.is_empty());

    // Many writers racing from the same previous value: exactly one wins.
    store.put("/c/race", b"0".to_vec(), None).await.expect("put");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.compare_and_put("/c/race", Expect::Value(b"0"), format!("w{i}").into_bytes(), None).await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.expect("task").expect("cas"));
    }
    assert_eq!(wins, 1);
});

conformance!(leases_expire_unless_kept_alive, |store: Arc<dyn PlacementStore>| async move {
    let ttl = Duration::from_secs(2);
    let kept = store.grant(ttl).await.expect("grant");
    let dropped = store.grant(ttl).await.expect("grant");
    let revoked = store.grant(ttl).await.expect("grant");
    store.put("/l/kept", b"k".to_vec(), Some(kept)).await.expect("put");
    store.put("/l/dropped", b"d".to_vec(), Some(dropped)).await.expect("put");
    store.put("/l/revoked", b"r".to_vec(), Some(revoked)).await.expect("put");
    store.put("/l/plain", b"p".to_vec(), None).await.expect("put");
    store.revoke(revoked).await.expect("revoke");
    assert!(!keys(&store, "/l/").await.contains(&"/l/revoked".to_owned()), "revoking deletes at once");

    // Renew one lease for well over its TTL; the other one lapses.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(4500) {
        store.keep_alive(kept).await.expect("keep alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(keys(&store, "/l/").await, vec!["/l/kept".to_owned(), "/l/plain".to_owned()]);
    assert_eq!(store.keep_alive(dropped).await, Err(StoreError::LeaseExpired(dropped)));
    assert!(matches!(
        store.put("/l/late", b"x".to_vec(), Some(dropped)).await,
        Err(StoreError::LeaseExpired(id)) if id == dropped
    ));
});

conformance!(watch_reports_changes, |store: Arc<dyn PlacementStore>| async move {
    let mut changes = store.watch("/w/").await.expect("watch");
    // The etcd watch announces itself once it is established.
    let _ = tokio::time::timeout(Duration::from_secs(2), changes.changed()).await;
    changes.borrow_and_update();
    store.put("/w/x", b"1".to_vec(), None).await.expect("put");
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.expect("a change is seen").expect("open");
    let lease = store.grant(Duration::from_secs(1)).await.expect("grant");
    store.put("/w/leased", b"1".to_vec(), Some(lease)).await.expect("put");
    changes.borrow_and_update();
    // Expiry is a change too (within the TTL plus etcd's expiry check).
    tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            changes.changed().await.expect("open");
            if !keys(&store, "/w/").await.contains(&"/w/leased".to_owned()) {
                break;
            }
        }
    })
    .await
    .expect("the expiry is seen");
});

fn shape() -> ModelShape {
    ModelShape { name: "t".into(), fingerprint: 7, moe_layers: vec![0, 1], num_experts: 8, expert_bytes: 1000 }
}

fn expert(id: &str, slots: u64) -> Member {
    Member {
        id: id.into(),
        role: Role::Expert,
        addr: format!("{id}:1"),
        devices: vec!["cpu".into()],
        memory_bytes: slots * 1000,
        fingerprint: 7,
        version: "test".into(),
        started_unix_ms: 0,
    }
}

fn router(id: &str) -> Member {
    Member { role: Role::Router, memory_bytes: 0, ..expert(id, 0) }
}

conformance!(members_register_and_vanish_with_their_lease, |store: Arc<dyn PlacementStore>| async move {
    let cluster = Cluster::new(store.clone(), "members").expect("name");
    let ttl = Duration::from_secs(2);
    let a = Session::register(cluster.clone(), &expert("a", 16), ttl).await.expect("register");
    let b = Session::register(cluster.clone(), &expert("b", 16), ttl).await.expect("register");
    let view = cluster.snapshot().await.expect("snapshot");
    assert_eq!(view.members.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(view.members["a"], expert("a", 16));
    // `a` stops renewing, as a killed process would; `b` renews on its own.
    a.abandon();
    let start = Instant::now();
    wait_until("a's registration to expire", Duration::from_secs(8), || async {
        !cluster.snapshot().await.expect("snapshot").members.contains_key("a")
    })
    .await;
    eprintln!("a gone after {:?} (TTL {ttl:?})", start.elapsed());
    assert!(cluster.snapshot().await.expect("snapshot").members.contains_key("b"), "b kept its lease");
    b.close().await.expect("close");
    assert!(cluster.snapshot().await.expect("snapshot").members.is_empty());
    assert!(Cluster::new(store, "bad/name").is_err());
});

conformance!(one_controller_and_fenced_placement_writes, |store: Arc<dyn PlacementStore>| async move {
    let cluster = Cluster::new(store.clone(), "elect").expect("name");
    let ttl = Duration::from_secs(2);
    let r1 = Session::register(cluster.clone(), &router("r1"), ttl).await.expect("register");
    let r2 = Session::register(cluster.clone(), &router("r2"), ttl).await.expect("register");
    assert!(cluster.campaign("r1", r1.lease()).await.expect("campaign"));
    assert!(!cluster.campaign("r2", r2.lease()).await.expect("campaign"), "one leader at a time");
    assert!(cluster.campaign("r1", r1.lease()).await.expect("campaign"), "the leader stays leader");
    assert_eq!(cluster.snapshot().await.expect("snapshot").leader.as_deref(), Some("r1"));

    // Placement writes compare the previous value: a writer with a stale view loses.
    let nodes = [expert("a", 16)];
    let refs: Vec<&Member> = nodes.iter().collect();
    let p1 = controller::plan_balanced(&shape(), &refs, None, 1, "t").expect("plan");
    assert!(cluster.write_placement(None, &p1).await.expect("write"));
    let raw1 = cluster.snapshot().await.expect("snapshot").placement_raw.expect("written");
    let mut p2 = p1.clone();
    p2.epoch = 2;
    assert!(!cluster.write_placement(None, &p2).await.expect("write"), "a placement exists");
    assert!(cluster.write_placement(Some(&raw1), &p2).await.expect("write"));
    let mut stale = p1.clone();
    stale.epoch = 99;
    assert!(!cluster.write_placement(Some(&raw1), &stale).await.expect("write"), "stale previous epoch");
    assert_eq!(cluster.snapshot().await.expect("snapshot").placement.expect("placement").epoch, 2);

    // The leader dies: its key expires with its lease and the other member is elected.
    r1.abandon();
    wait_until("r2 to be elected", Duration::from_secs(8), || async {
        cluster.campaign("r2", r2.lease()).await.expect("campaign")
    })
    .await;
    assert!(cluster.resign("r2").await.expect("resign"));
});

conformance!(controller_places_repairs_and_rebalances, |store: Arc<dyn PlacementStore>| async move {
    let cluster = Cluster::new(store.clone(), "ctl").expect("name");
    let ttl = Duration::from_secs(2);
    let options = ControllerOptions { settle: Duration::from_millis(300), tick: Duration::from_millis(100) };
    let a = Session::register(cluster.clone(), &expert("a", 20), ttl).await.expect("register");
    let b = Session::register(cluster.clone(), &expert("b", 20), ttl).await.expect("register");
    // Two candidate controllers, each with its own session, as two routers have.
    let mut controllers = Vec::new();
    let mut sessions = Vec::new();
    for id in ["r1", "r2"] {
        let s = Arc::new(Session::register(cluster.clone(), &router(id), ttl).await.expect("register"));
        let (s2, options) = (s.clone(), options.clone());
        controllers.push(tokio::spawn(async move { controller::run(&s2, id, shape(), options).await }));
        sessions.push(s);
    }
    let placement = |min_epoch: u64| {
        let cluster = cluster.clone();
        async move {
            let view = cluster.snapshot().await.expect("snapshot");
            view.placement.filter(|p| p.epoch >= min_epoch)
        }
    };
    wait_until("the initial placement", Duration::from_secs(10), || async { placement(1).await.is_some() }).await;
    let p1 = placement(1).await.expect("placement");
    p1.validate(&shape()).expect("every expert placed");
    assert_eq!(p1.counts(), vec![16, 16], "room for the 16 experts on each node: every expert on both");
    let view = cluster.snapshot().await.expect("snapshot");
    assert_eq!(view.model, Some(shape()));
    let leader = view.leader.expect("a leader");

    // A third node joins: the next epoch gives it a share.
    let c = Session::register(cluster.clone(), &expert("c", 20), ttl).await.expect("register");
    wait_until("the join epoch", Duration::from_secs(10), || async { placement(2).await.is_some() }).await;
    let p2 = placement(2).await.expect("placement");
    p2.validate(&shape()).expect("every expert placed");
    assert!(p2.counts().iter().all(|&n| n > 0), "{:?}", p2.counts());

    // A node is drained: the next epoch leaves it out, every expert still placed.
    cluster.drain("a", None).await.expect("drain");
    wait_until("the drain epoch", Duration::from_secs(10), || async { placement(3).await.is_some() }).await;
    let p3 = placement(3).await.expect("placement");
    p3.validate(&shape()).expect("every expert placed");
    assert!(p3.node_index("a").is_none());

    // The leading controller's member dies: the other takes over and repairs the loss of a node.
    let i = usize::from(leader == "r2");
    controllers[i].abort();
    if let Some(s) = Arc::into_inner(sessions.remove(i)) {
        s.abandon();
    }
    c.abandon();
    wait_until("the repair epoch by the new leader", Duration::from_secs(15), || async {
        placement(4).await.is_some_and(|p| p.node_index("c").is_none())
    })
    .await;
    let view = cluster.snapshot().await.expect("snapshot");
    assert_ne!(view.leader.as_deref(), Some(leader.as_str()), "the other controller leads");
    view.placement.expect("placement").validate(&shape()).expect("every expert placed");

    // An operator request is answered with the epoch written for it.
    let id = cluster.request("test", RequestKind::Rebalance).await.expect("request");
    wait_until("the rebalance", Duration::from_secs(10), || async {
        cluster.snapshot().await.expect("snapshot").outcome.is_some_and(|o| o.request == id)
    })
    .await;
    let view = cluster.snapshot().await.expect("snapshot");
    let epoch = view.outcome.expect("outcome").result.expect("rebalanced");
    assert_eq!(view.placement.expect("placement").epoch, epoch);
    assert!(view.request.is_none(), "the answered request is cleared");
    drop((a, b));
});
