-- Example workstation procedures, for the outpatient/emergency (门急诊) and the inpatient
-- (住院) doctor workstations: the four behaviours of the requirement.
--   1. reception badge   his.reception_badge()
--   2. ordering check    his.check_item()
--   3. save gate         his.save_orders()   (catches HM001 and hands the page to the UI)
--   4. decide, download  his.decide(), his.recognised_report(), his.order_to_perform()
-- visit_type: '1' 门诊, '2' 急诊 (outpatient/emergency workstation), '3' 住院 (inpatient).

-- 1. At reception: green with the count when recognisable reports exist, grey at 0,
--    'unknown' when the platform cannot be asked (the workstation shows the icon disabled).
CREATE FUNCTION his.reception_badge(p_patient_id text, p_visit_no text, p_doctor_no text, p_dept_code text,
                                    OUT colour text, OUT count integer, OUT url text)
LANGUAGE plpgsql AS $$
DECLARE
    p his.patient;
    answer jsonb;
BEGIN
    SELECT * INTO p FROM his.patient WHERE patient_id = p_patient_id;
    answer := hmr_list_recognitions(p.id_type, p.id_no, p_visit_no, p_doctor_no, p_dept_code);
    count := coalesce((answer->>'count')::int, 0);
    url := answer->>'url';
    -- invalid_patient: the platform refuses the patient's identity; grey, and the HIS shows
    -- answer->>'reason' so that the registration is corrected.
    colour := CASE WHEN answer->>'status' = 'invalid_patient' THEN 'grey' WHEN answer->>'status' <> 'ok' THEN 'unknown'
                   WHEN count > 0 THEN 'green' ELSE 'grey' END;
END
$$;

-- 2. While ordering one item (门诊 and, through 5., 住院): is it a duplicate? When `duplicate`
--    is true the workstation must open the check's page at `url`, where the doctor chooses
--    互认 or 不互认 before going on (or decides in the HIS: his.decide with `check_id`). Saving
--    (3.) then passes the gate without a second prompt: the decision counts for the order.
CREATE FUNCTION his.check_item(p_patient_id text, p_visit_type text, p_visit_no text, p_doctor_no text,
                               p_dept_code text, p_order_id text, p_item_type text, p_item_code text)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT hmr_check_order(
        jsonb_build_object('id_type', p.id_type, 'id_no', p.id_no, 'patient_id', p.patient_id,
                           'visit_type', p_visit_type, 'visit_no', p_visit_no,
                           'doctor_no', p_doctor_no, 'dept_code', p_dept_code),
        jsonb_build_array(jsonb_build_object('order_id', p_order_id, 'item_code', p_item_code, 'type', p_item_type)))
      FROM his.patient p WHERE p.patient_id = p_patient_id
$$;

-- 3. Saving a prescription (a JSON array of order rows). The gate refuses a duplicate
--    without a decision (SQLSTATE HM001); this procedure turns that into an answer the
--    workstation shows as the forced 互认/不互认 page.
CREATE FUNCTION his.save_orders(p_orders jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    detail text;
    message text;
BEGIN
    INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type, item_code, item_name)
    SELECT o.order_id, o.patient_id, o.visit_type, o.visit_no, o.doctor_no, o.dept_code, o.item_type, o.item_code, o.item_name
      FROM jsonb_to_recordset(p_orders) AS o(order_id text, patient_id text, visit_type text, visit_no text,
                                             doctor_no text, dept_code text, item_type text, item_code text,
                                             item_name text);
    RETURN jsonb_build_object('saved', true);
EXCEPTION WHEN SQLSTATE 'HM001' THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, message = MESSAGE_TEXT;
    RETURN jsonb_build_object('saved', false, 'message', message, 'decide', detail::jsonb);
END
$$;

-- 4a. The doctor's choice on the page. 互认: the item is not performed again (the saved order
--     is marked `recognised`); 不互认 needs a reason (01–06; 06 with text).
CREATE FUNCTION his.decide(p_check_id text, p_order_id text, p_patient_id text, p_item_code text,
                           p_recognise boolean, p_reason_code text DEFAULT NULL, p_reason_text text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    recorded jsonb;
BEGIN
    recorded := hmr_record_decision(p_check_id, p_order_id, p_recognise, p_reason_code, p_reason_text);
    IF p_recognise THEN
        INSERT INTO his.recognised_items (patient_id, item_code, report_id)
        VALUES (p_patient_id, p_item_code, recorded->>'report_id')
        ON CONFLICT (patient_id, item_code) DO UPDATE SET report_id = EXCLUDED.report_id, decided_at = now();
    END IF;
    RETURN recorded;
END
$$;

-- 4c. Before an order is sent to the lab or the exam room: was it recognised (互认)? Then it
--     is not performed; the report it was recognised with is shown instead. (Also for a
--     decision taken on the platform's page: hmr_page_decisions() records it.)
CREATE FUNCTION his.order_to_perform(p_order_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT hmr_order_recognition(p_order_id)->>'decision' IS DISTINCT FROM 'recognised'
$$;

-- 4b. After 互认: the other hospital's report, kept in this database (hmr.retained_reports).
CREATE FUNCTION his.recognised_report(p_report_id text, p_format text DEFAULT 'pdf') RETURNS bytea
LANGUAGE sql AS $$ SELECT hmr_download_report(p_report_id, p_format) $$;

-- Outpatient/emergency and inpatient entry points: the same behaviours, their visit types.
CREATE FUNCTION his.outpatient_check_item(p_patient_id text, p_visit_no text, p_doctor_no text, p_dept_code text,
                                          p_order_id text, p_item_type text, p_item_code text,
                                          p_emergency boolean DEFAULT false)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT his.check_item(p_patient_id, CASE WHEN p_emergency THEN '2' ELSE '1' END, p_visit_no, p_doctor_no,
                          p_dept_code, p_order_id, p_item_type, p_item_code)
$$;

CREATE FUNCTION his.inpatient_check_item(p_patient_id text, p_admission_no text, p_doctor_no text, p_dept_code text,
                                         p_order_id text, p_item_type text, p_item_code text)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT his.check_item(p_patient_id, '3', p_admission_no, p_doctor_no, p_dept_code, p_order_id, p_item_type, p_item_code)
$$;
