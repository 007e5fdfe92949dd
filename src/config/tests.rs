use super::*;
use figment::Jail;

#[test]
fn defaults_are_valid_and_local() {
    Jail::expect_with(|_| {
        let c = Config::load(None).unwrap();
        assert_eq!(c.profile, Profile::Local);
        assert!(c.dev_tokens());
        assert_eq!(c.server.listen, "0.0.0.0:8000");
        assert_eq!(c.limits.outbound_queue, 1024);
        assert_eq!(c.chat.open_conversations, vec!["general".to_string()]);
        assert_eq!(c.data_dir(), Some(PathBuf::from("./data")), "local runs keep their history");
        assert_eq!(c.chat.fsync, Fsync::Everysec);
        Ok(())
    });
}

#[test]
fn data_dir_is_memory_in_production_unless_set() {
    Jail::expect_with(|jail| {
        jail.set_env("CHAT_PROFILE", "production");
        jail.set_env("CHAT_AUTH__JWT_SECRET", "0123456789abcdef0123456789abcdef-jwt");
        jail.set_env("CHAT_AUTH__API_KEY", "0123456789abcdef0123456789abcdef-api");
        assert_eq!(Config::load(None).unwrap().data_dir(), None);
        jail.set_env("CHAT_CHAT__DATA_DIR", "/var/lib/crm-chat");
        jail.set_env("CHAT_CHAT__FSYNC", "always");
        let c = Config::load(None).unwrap();
        assert_eq!(c.data_dir(), Some(PathBuf::from("/var/lib/crm-chat")));
        assert_eq!(c.chat.fsync, Fsync::Always);
        jail.set_env("CHAT_CHAT__DATA_DIR", "memory");
        assert_eq!(Config::load(None).unwrap().data_dir(), None);
        jail.set_env("CHAT_CHAT__FSYNC", "sometimes");
        assert_eq!(Config::load(None).unwrap_err().key, "chat.fsync");
        Ok(())
    });
}

#[test]
fn env_overrides_file_which_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file("chat.toml", "[server]\nheartbeat_s = 7\ndrain_s = 3\n[limits]\nmax_body_chars = 10\n")?;
        jail.set_env("CHAT_SERVER__HEARTBEAT_S", "9");
        jail.set_env("CHAT_CHAT__OPEN_CONVERSATIONS", "[\"general\",\"random\"]");
        jail.set_env("CHAT_CONFIG", "ignored-by-figment");
        let c = Config::load(Some("chat.toml".as_ref())).unwrap();
        assert_eq!(c.server.heartbeat_s, 9);
        assert_eq!(c.server.drain_s, 3);
        assert_eq!(c.limits.max_body_chars, 10);
        assert_eq!(c.chat.open_conversations, vec!["general", "random"]);
        Ok(())
    });
}

#[test]
fn production_requires_long_secrets_and_refuses_dev_tokens() {
    Jail::expect_with(|jail| {
        jail.set_env("CHAT_PROFILE", "production");
        let e = Config::load(None).unwrap_err();
        assert_eq!(e.key, "auth.jwt_secret");
        jail.set_env("CHAT_AUTH__JWT_SECRET", "short");
        let e = Config::load(None).unwrap_err();
        assert!(e.problem.contains("32 bytes"), "{e}");
        jail.set_env("CHAT_AUTH__JWT_SECRET", "x".repeat(32));
        jail.create_file("key", &format!("{}\n", "k".repeat(40)))?;
        jail.set_env("CHAT_AUTH__API_KEY_FILE", "key");
        let c = Config::load(None).unwrap();
        assert_eq!(c.api_key(), "k".repeat(40));
        assert!(!c.dev_tokens());
        jail.set_env("CHAT_AUTH__DEV_TOKENS", "true");
        assert_eq!(Config::load(None).unwrap_err().key, "auth.dev_tokens");
        Ok(())
    });
}

#[test]
fn the_byte_bucket_holds_the_largest_body() {
    Jail::expect_with(|jail| {
        // 4000 characters, each escaped to 6 bytes, and the quotes.
        jail.set_env("CHAT_LIMITS__SEND_BYTES_BURST", "24001");
        assert_eq!(Config::load(None).unwrap_err().key, "limits.send_bytes_burst");
        jail.set_env("CHAT_LIMITS__SEND_BYTES_BURST", "24002");
        assert!(Config::load(None).is_ok());
        jail.set_env("CHAT_LIMITS__SEND_BYTES_PER_S", "0");
        assert_eq!(Config::load(None).unwrap_err().key, "limits.send_bytes_per_s");
        Ok(())
    });
}

#[test]
fn errors_name_the_key() {
    Jail::expect_with(|jail| {
        jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "2");
        assert_eq!(Config::load(None).unwrap_err().key, "limits.outbound_queue");
        jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "notanumber");
        assert_eq!(Config::load(None).unwrap_err().key, "limits.outbound_queue");
        jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "64");
        jail.set_env("CHAT_SERVER__LISTEN", "nonsense");
        assert_eq!(Config::load(None).unwrap_err().key, "server.listen");
        jail.set_env("CHAT_SERVER__LISTEN", "127.0.0.1:0");
        jail.set_env("CHAT_SERVER__NO_SUCH_KEY", "1");
        let e = Config::load(None).unwrap_err();
        assert!(e.problem.contains("no_such_key"), "{e}");
        Ok(())
    });
}

#[test]
fn service_link_variables_are_ignored_nested_typos_stay_fatal() {
    Jail::expect_with(|jail| {
        // What Kubernetes injects for a Service named `chat-crm-chat`.
        jail.set_env("CHAT_CRM_CHAT_PORT", "tcp://10.0.0.1:8000");
        jail.set_env("CHAT_CRM_CHAT_PORT_8000_TCP_ADDR", "10.0.0.1");
        jail.set_env("CHAT_CRM_CHAT_SERVICE_HOST", "10.0.0.1");
        jail.set_env("CHAT_CRM_CHAT_SERVICE_PORT", "8000");
        jail.set_env("CHAT_PROFILE", "local");
        let c = Config::load(None).unwrap();
        assert_eq!(c.profile, Profile::Local);
        let ignored = Config::ignored_env_vars();
        assert!(ignored.contains(&"CHAT_CRM_CHAT_PORT".to_string()), "{ignored:?}");
        assert!(!ignored.iter().any(|v| v == "CHAT_PROFILE"));
        jail.set_env("CHAT_SERVER__LISTNE", "0.0.0.0:1");
        assert!(Config::load(None).unwrap_err().problem.contains("listne"));
        Ok(())
    });
}

#[test]
fn production_refuses_the_public_development_strings() {
    Jail::expect_with(|jail| {
        jail.set_env("CHAT_PROFILE", "production");
        jail.set_env("CHAT_AUTH__JWT_SECRET", LOCAL_DEV_JWT_SECRET);
        jail.set_env("CHAT_AUTH__API_KEY", "k".repeat(40));
        let e = Config::load(None).unwrap_err();
        assert_eq!(e.key, "auth.jwt_secret");
        assert!(e.problem.contains("openssl rand"), "says how: {e}");
        jail.set_env("CHAT_AUTH__JWT_SECRET", "j".repeat(40));
        jail.set_env("CHAT_AUTH__API_KEY", LOCAL_DEV_API_KEY);
        assert_eq!(Config::load(None).unwrap_err().key, "auth.api_key");
        Ok(())
    });
}

proptest::proptest! {
    /// Whatever the limits, validation either refuses them naming a key
    /// or the node builds (no panic from any value it accepts).
    #[test]
    fn every_valid_limit_builds_a_node(
        send_per_s in proptest::prop_oneof![
            proptest::num::f64::ANY,
            1e-12f64..1e12,
            proptest::sample::select(vec![0.0, -1.0, f64::MIN_POSITIVE, 1e-3, 1e6, 1e6 + 1.0, f64::MAX]),
        ],
        requests_per_s in 1e-6f64..1e9,
        send_burst in proptest::num::u32::ANY,
        requests_burst in proptest::num::u32::ANY,
        max_body_chars in 0usize..2_000_000,
        max_reply_bytes in 0usize..(300 << 20),
        outbound_bytes in 0usize..(2 << 30),
        outbound_queue in 0usize..(2 << 20),
    ) {
        let mut c = Config::default();
        c.limits.send_per_s = send_per_s;
        c.limits.requests_per_s = requests_per_s;
        c.limits.send_burst = send_burst;
        c.limits.requests_burst = requests_burst;
        c.limits.max_body_chars = max_body_chars;
        c.limits.max_reply_bytes = max_reply_bytes;
        c.limits.outbound_bytes = outbound_bytes;
        c.limits.outbound_queue = outbound_queue;
        if let Err(e) = c.validate() {
            proptest::prop_assert!(e.key.starts_with("limits."), "{e}");
        } else {
            let hub = crate::hub::Hub::new();
            let engine = std::sync::Arc::new(crate::engine::memory::MemoryEngine::new(hub.clone(), 10));
            let node = crate::node::Node::new(std::sync::Arc::new(c), engine, hub);
            proptest::prop_assert!(node.check_send_rate(&"u".into()).is_ok());
        }
    }
}

#[test]
fn secrets_are_redacted() {
    Jail::expect_with(|jail| {
        jail.set_env("CHAT_AUTH__JWT_SECRET", "super-secret-value");
        jail.set_env("CHAT_VALKEY__URL", "redis://:pw@localhost:6379");
        let c = Config::load(None).unwrap();
        let shown = format!("{} {:?}", c.to_redacted_toml(), c);
        assert!(!shown.contains("super-secret-value"));
        assert!(!shown.contains(":pw@"));
        assert!(shown.contains("[redacted]"));
        Ok(())
    });
}

#[test]
fn webhooks_need_a_long_secret_and_known_events() {
    Jail::expect_with(|jail| {
        let c = Config::load(None).unwrap();
        assert!(c.webhooks.url.is_none());
        assert!(c.webhooks.events.contains(&"message.unread".to_string()), "{:?}", c.webhooks.events);
        assert!(!c.webhooks.events.iter().any(|e| e.starts_with("user.")), "presence is off by default");
        jail.set_env("CHAT_WEBHOOKS__URL", "https://crm.example/hooks/chat");
        assert_eq!(Config::load(None).unwrap_err().key, "webhooks.secret");
        jail.set_env("CHAT_WEBHOOKS__SECRET", "short");
        assert!(Config::load(None).unwrap_err().problem.contains("32 bytes"));
        // whsec_ + base64 of 24 bytes: too short a key once decoded.
        jail.set_env("CHAT_WEBHOOKS__SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert!(Config::load(None).unwrap_err().problem.contains("32 bytes"));
        jail.set_env("CHAT_WEBHOOKS__SECRET", "s".repeat(32));
        jail.set_env("CHAT_WEBHOOKS__EVENTS", "message.created, user.online");
        let c = Config::load(None).unwrap();
        assert_eq!(c.webhooks.events, ["message.created", "user.online"]);
        jail.set_env("CHAT_WEBHOOKS__EVENTS", "[\"message.read\"]");
        assert_eq!(Config::load(None).unwrap().webhooks.events, ["message.read"]);
        jail.set_env("CHAT_WEBHOOKS__EVENTS", "message.deleted");
        assert_eq!(Config::load(None).unwrap_err().key, "webhooks.events");
        jail.set_env("CHAT_WEBHOOKS__EVENTS", "message.read");
        jail.set_env("CHAT_WEBHOOKS__URL", "ftp://crm.example/");
        assert_eq!(Config::load(None).unwrap_err().key, "webhooks.url");
        Ok(())
    });
}

#[test]
fn ack_replicas_refuses_negative_counts_and_a_zero_timeout() {
    Jail::expect_with(|jail| {
        let c = Config::load(None).unwrap();
        assert_eq!((c.valkey.ack_replicas, c.valkey.ack_timeout_ms), (0, 1000), "defaults: today's behaviour");
        for bad in ["-1", "101", "one"] {
            jail.set_env("CHAT_VALKEY__ACK_REPLICAS", bad);
            assert_eq!(Config::load(None).unwrap_err().key, "valkey.ack_replicas", "{bad}");
        }
        jail.set_env("CHAT_VALKEY__ACK_REPLICAS", "1");
        for bad in ["0", "-5", "60001"] {
            jail.set_env("CHAT_VALKEY__ACK_TIMEOUT_MS", bad);
            assert_eq!(Config::load(None).unwrap_err().key, "valkey.ack_timeout_ms", "{bad}");
        }
        jail.set_env("CHAT_VALKEY__ACK_TIMEOUT_MS", "250");
        let c = Config::load(None).unwrap();
        assert_eq!((c.valkey.ack_replicas, c.valkey.ack_timeout_ms), (1, 250));
        Ok(())
    });
}
