//! The tables, shared by both backends (only SQL types both have: Text, Integer, BigInt, Bool,
//! Timestamp as naive UTC).

diesel::table! {
    users (id) {
        id -> Text,
        username -> Text,
        username_key -> Text,
        email -> Text,
        password_hash -> Nullable<Text>,
        full_name -> Nullable<Text>,
        avatar_url -> Nullable<Text>,
        google_id -> Nullable<Text>,
        is_active -> Bool,
        is_verified -> Bool,
        subscription_plan -> Text,
        preferred_region -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        last_login -> Nullable<Timestamp>,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        user_id -> Text,
        user_agent -> Nullable<Text>,
        ip_address -> Nullable<Text>,
        created_at -> Timestamp,
        last_used_at -> Timestamp,
        expires_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
        revoked_reason -> Nullable<Text>,
        rotated_from -> Nullable<Text>,
        rotated_at -> Nullable<Timestamp>,
        successor_sealed -> Nullable<Text>,
    }
}

diesel::table! {
    login_attempts (subject) {
        subject -> Text,
        failures -> Integer,
        expires_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    refresh_tokens (token_hash) {
        token_hash -> Text,
        session_id -> Text,
        created_at -> Timestamp,
        used_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    audit_events (id) {
        id -> BigInt,
        occurred_at -> Timestamp,
        event -> Text,
        user_id -> Nullable<Text>,
        session_id -> Nullable<Text>,
        ip_address -> Nullable<Text>,
        request_id -> Nullable<Text>,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    environments (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        template -> Text,
        provider -> Text,
        status -> Text,
        status_version -> BigInt,
        progress -> Integer,
        phase -> Nullable<Text>,
        message -> Nullable<Text>,
        error_message -> Nullable<Text>,
        region -> Text,
        size -> Text,
        resources -> Text,
        environment_variables -> Text,
        display_name -> Text,
        operation_id -> Nullable<Text>,
        create_attempts -> Integer,
        instance_id -> Nullable<Text>,
        ip_address -> Nullable<Text>,
        ssh_port -> Nullable<Integer>,
        ssh_user -> Text,
        ssh_public_key -> Text,
        ssh_private_key -> Text,
        host_public_key -> Text,
        host_private_key -> Nullable<Text>,
        dev_password_hash -> Nullable<Text>,
        installation_completed -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        last_accessed -> Nullable<Timestamp>,
    }
}

diesel::table! {
    environment_leases (environment_id) {
        environment_id -> Text,
        owner_node -> Nullable<Text>,
        epoch -> BigInt,
    }
}

diesel::table! {
    environment_commands (id) {
        id -> Text,
        environment_id -> Text,
        user_id -> Text,
        target_node -> Text,
        command -> Text,
        state -> Text,
        reply -> Nullable<Text>,
        created_at -> Timestamp,
        expires_at -> Timestamp,
        answered_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    environment_events (id) {
        id -> BigInt,
        environment_id -> Text,
        occurred_at -> Timestamp,
        kind -> Text,
        level -> Text,
        source -> Text,
        message -> Text,
        status -> Nullable<Text>,
        status_version -> Nullable<BigInt>,
        progress -> Nullable<Integer>,
    }
}

diesel::table! {
    environment_metrics (id) {
        id -> BigInt,
        environment_id -> Text,
        sampled_at -> Timestamp,
        cpu_usage -> Double,
        memory_usage -> Double,
        disk_usage -> Double,
        network_in -> BigInt,
        network_out -> BigInt,
        uptime -> BigInt,
    }
}

diesel::table! {
    templates (id) {
        id -> Text,
        definition -> Text,
        builtin -> Bool,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    preview_ports (environment_id, port) {
        environment_id -> Text,
        port -> Integer,
        visibility -> Text,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    preview_grants (token_hash) {
        token_hash -> Text,
        kind -> Text,
        session_id -> Text,
        user_id -> Text,
        environment_id -> Text,
        port -> Integer,
        expires_at -> Timestamp,
        created_at -> Timestamp,
    }
}

diesel::table! {
    nodes (id) {
        id -> Text,
        address -> Text,
        provider -> Text,
        version -> Text,
        started_at -> Timestamp,
        heartbeat_at -> Timestamp,
        draining -> Bool,
        jwt_keys -> Text,
        seal_keys -> Text,
    }
}

diesel::table! {
    terminals (id) {
        id -> Text,
        node_id -> Text,
        environment_id -> Text,
        user_id -> Text,
        session_id -> Text,
        tmux_session -> Text,
        cols -> Integer,
        rows -> Integer,
        attached -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    connection_slots (id) {
        id -> Text,
        node_id -> Text,
        user_id -> Text,
        kind -> Text,
        opened_at -> Timestamp,
    }
}

diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(terminals -> nodes (node_id));
diesel::joinable!(connection_slots -> nodes (node_id));
diesel::joinable!(preview_grants -> sessions (session_id));
diesel::joinable!(environments -> users (user_id));
diesel::joinable!(environment_events -> environments (environment_id));
diesel::joinable!(environment_commands -> environments (environment_id));
diesel::joinable!(environment_leases -> environments (environment_id));
diesel::joinable!(environment_metrics -> environments (environment_id));
diesel::joinable!(refresh_tokens -> sessions (session_id));
diesel::allow_tables_to_appear_in_same_query!(
    users,
    sessions,
    refresh_tokens,
    login_attempts,
    audit_events,
    environments,
    environment_events,
    environment_metrics,
    environment_commands,
    environment_leases,
    templates,
    preview_ports,
    preview_grants,
    nodes,
    terminals,
    connection_slots,
);
