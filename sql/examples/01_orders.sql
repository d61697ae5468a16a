-- Example: the HIS order table (门急诊/住院医嘱) and the gate on it. Shows how a DBA connects
-- the recognise/decline gate to their own schema in SQL alone.

CREATE TABLE his.orders (
    order_id     text PRIMARY KEY,
    patient_id   text NOT NULL,
    visit_type   text NOT NULL,              -- 1 门诊, 2 急诊, 3 住院
    visit_no     text NOT NULL,
    doctor_no    text NOT NULL,
    dept_code    text NOT NULL,
    item_type    text NOT NULL,              -- lab, exam, drug, …
    item_code    text NOT NULL,              -- the HIS/LIS item code (mapped via hmr.item_map)
    item_name    text,
    status       text NOT NULL DEFAULT 'new',  -- new → sent to LIS/RIS; recognised = not performed again
    recognised_report_id text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- 互认 decided before saving: the order is saved as `recognised` and never sent to the lab.
CREATE TABLE his.recognised_items (
    patient_id  text NOT NULL,
    item_code   text NOT NULL,
    report_id   text NOT NULL,
    decided_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, item_code)
);

CREATE FUNCTION his.mark_recognised_orders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT 'recognised', r.report_id INTO NEW.status, NEW.recognised_report_id
      FROM his.recognised_items r
     WHERE r.patient_id = NEW.patient_id AND r.item_code = NEW.item_code
       AND r.decided_at > now() - interval '1 day';
    NEW.status := coalesce(NEW.status, 'new');
    RETURN NEW;
END
$$;
CREATE TRIGGER orders_mark_recognised BEFORE INSERT ON his.orders
    FOR EACH ROW EXECUTE FUNCTION his.mark_recognised_orders();

-- The gate: one platform check per saved prescription (statement), over lab/exam lines
-- that are to be performed. The query reads the transition table `new_rows`.
SELECT hmr.guard('his.orders', $q$
    SELECT jsonb_build_object('id_type', p.id_type, 'id_no', p.id_no, 'patient_id', o.patient_id,
                              'visit_type', o.visit_type, 'visit_no', o.visit_no,
                              'doctor_no', o.doctor_no, 'dept_code', o.dept_code) AS visit,
           jsonb_agg(jsonb_build_object('order_id', o.order_id, 'item_code', o.item_code,
                                        'type', o.item_type)) AS orders
      FROM new_rows o
      JOIN his.patient p USING (patient_id)
     WHERE o.item_type IN ('lab', 'exam') AND o.status <> 'recognised'
     GROUP BY p.id_type, p.id_no, o.patient_id, o.visit_type, o.visit_no, o.doctor_no, o.dept_code
$q$);
