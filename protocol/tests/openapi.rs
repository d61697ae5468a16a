//! `docs/openapi.yaml` cannot drift from the answers' types: its generated block is
//! `hmr_protocol::answers::openapi_schemas()`, written as one JSON line per schema (JSON is
//! YAML). After changing a type: `HMR_BLESS=1 cargo test -p hmr-protocol --test openapi`.

const BEGIN: &str = "    # BEGIN generated from protocol/src/answers.rs (cargo test -p hmr-protocol --test openapi)\n";
const END: &str = "    # END generated\n";

fn generated() -> String {
    let mut out = String::from(BEGIN);
    for (name, schema) in hmr_protocol::answers::openapi_schemas() {
        out.push_str(&format!("    {name}: {}\n", serde_json::to_string(&schema).unwrap()));
    }
    out.push_str(END);
    out
}

#[test]
fn openapi_yaml_holds_the_answers_schemas() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/openapi.yaml has no generated block (the BEGIN/END lines under components.schemas)");
    };
    let current = &text[start..end + END.len()];
    let wanted = generated();
    if std::env::var_os("HMR_BLESS").is_some() {
        std::fs::write(path, text.replace(current, &wanted)).unwrap();
        return;
    }
    assert_eq!(
        current, wanted,
        "docs/openapi.yaml's schemas differ from protocol/src/answers.rs: run HMR_BLESS=1 cargo test -p hmr-protocol --test openapi"
    );
}

#[test]
fn every_schema_the_paths_name_is_generated() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml")).unwrap();
    let schemas = hmr_protocol::answers::openapi_schemas();
    for name in ["ListResult", "QueryResult", "PrescriptionCheckResult", "DecisionResult"] {
        assert!(schemas.contains_key(name), "{name} not generated");
        assert!(
            text.contains(&format!("#/components/schemas/{name}")),
            "docs/openapi.yaml's paths do not answer with {name}"
        );
    }
}
