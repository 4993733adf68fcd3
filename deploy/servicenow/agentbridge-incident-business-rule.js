/*
 * agentbridge — ServiceNow Business Rule template: post every new or updated incident to the
 * agentbridge normalizer, signed with HMAC-SHA256.
 *
 * Install (System Definition → Business Rules → New):
 *   Name: agentbridge: post incident     Table: Incident [incident]     Active, Advanced
 *   When: async (so the user's save never waits on the network)   Insert: yes   Update: yes
 *   Condition (optional): e.g. current.active == true
 *   Script: this file.
 *
 * System properties (System Properties → All Properties → New):
 *   x_agentbridge.endpoint  string     https://<normalizer host>/ingest/servicenow
 *   x_agentbridge.secret    password2  the shared HMAC key, the same value as
 *                                      sources.servicenow.ingress.secret in agentbridge's config
 *   (Check on your release that gs.getProperty returns the password2 value in clear text to
 *   this script; otherwise keep the key in a Connection & Credential alias and read it there.)
 *
 * Matching agentbridge configuration:
 *   sources:
 *     servicenow:
 *       kind: servicenow
 *       ingress:
 *         kind: hmac
 *         header: X-Agentbridge-Signature
 *         encoding: base64
 *         timestamp_header: X-Agentbridge-Timestamp
 *         secret: {env: SERVICENOW_WEBHOOK_SECRET}
 *
 * What is sent: the record's fields in the Table API layout (strings; references as
 * {link, value, display_value}; "" for unset), plus `comments` (the newest customer-visible
 * journal entry) and `instance`. The normalizer derives the event id from sys_id and
 * sys_mod_count (each save is one event; a retried post is a duplicate) and the type from
 * sys_mod_count (0 → incident.created, else incident.updated). To name events yourself, add
 * `event_id` / `event_type` to the body.
 *
 * Signature: X-Agentbridge-Timestamp = Unix seconds; X-Agentbridge-Signature =
 * base64(HMAC-SHA256(key, timestamp + "." + body)). The normalizer refuses requests whose
 * timestamp is more than its freshness window (default 5 minutes) away from its clock.
 */
(function executeRule(current, previous /* null in async rules */) {
    var endpoint = gs.getProperty('x_agentbridge.endpoint');
    var secret = gs.getProperty('x_agentbridge.secret');
    if (!endpoint || !secret) {
        gs.error('agentbridge: x_agentbridge.endpoint or x_agentbridge.secret is not set; incident ' + current.getValue('number') + ' not sent');
        return;
    }

    var FIELDS = [
        'sys_id', 'number', 'short_description', 'description', 'priority', 'urgency', 'impact',
        'state', 'category', 'subcategory', 'contact_type', 'caller_id', 'company',
        'assignment_group', 'assigned_to', 'opened_at', 'sys_created_on', 'sys_updated_on',
        'sys_mod_count', 'sys_class_name'
    ];
    var base = gs.getProperty('glide.servlet.uri'); // https://<instance>.service-now.com/
    var body = {};
    for (var i = 0; i < FIELDS.length; i++) {
        var name = FIELDS[i];
        var el = current.getElement(name);
        if (el == null) {
            continue;
        }
        var ed = el.getED();
        if (ed.isReference() && !el.nil()) {
            body[name] = {
                link: base + 'api/now/table/' + ed.getReference() + '/' + el.toString(),
                value: el.toString(),
                display_value: el.getDisplayValue()
            };
        } else {
            // getValue gives the internal value (UTC date-times, choice values), as the Table API does.
            body[name] = el.nil() ? '' : String(current.getValue(name));
        }
    }
    body.comments = String(current.comments.getJournalEntry(1) || '');
    body.instance = base.replace(/^https?:\/\//, '').replace(/\/$/, '');

    var payload = JSON.stringify(body);
    var timestamp = String(Math.floor(new GlideDateTime().getNumericValue() / 1000));
    // generateMac takes the key base64-encoded and returns the MAC base64-encoded.
    var signature = new GlideCertificateEncryption().generateMac(
        GlideStringUtil.base64Encode(secret), 'HmacSHA256', timestamp + '.' + payload);

    var request = new sn_ws.RESTMessageV2();
    request.setEndpoint(endpoint);
    request.setHttpMethod('post');
    request.setRequestHeader('Content-Type', 'application/json');
    request.setRequestHeader('X-Agentbridge-Timestamp', timestamp);
    request.setRequestHeader('X-Agentbridge-Signature', signature);
    request.setRequestBody(payload);
    request.setHttpTimeout(10000);

    // The normalizer answers 202 only after the event is durably on the broker. Anything
    // else (503 while the broker is down, a network error) is retried a few times here; the
    // event id makes a retry that did get through a harmless duplicate.
    var attempts = 3;
    for (var attempt = 1; attempt <= attempts; attempt++) {
        try {
            var response = request.execute();
            var status = response.getStatusCode();
            if (status == 202) {
                return;
            }
            if (status == 401 || status == 404 || status == 413 || status == 415) {
                gs.error('agentbridge: incident ' + body.number + ' refused with HTTP ' + status + ': ' + response.getBody());
                return; // a configuration problem: retrying cannot help
            }
            gs.warn('agentbridge: incident ' + body.number + ' attempt ' + attempt + ' got HTTP ' + status);
        } catch (e) {
            gs.warn('agentbridge: incident ' + body.number + ' attempt ' + attempt + ' failed: ' + e);
        }
        if (attempt < attempts) {
            // Re-sign: the timestamp must stay fresh.
            timestamp = String(Math.floor(new GlideDateTime().getNumericValue() / 1000));
            signature = new GlideCertificateEncryption().generateMac(
                GlideStringUtil.base64Encode(secret), 'HmacSHA256', timestamp + '.' + payload);
            request.setRequestHeader('X-Agentbridge-Timestamp', timestamp);
            request.setRequestHeader('X-Agentbridge-Signature', signature);
            gs.sleep(2000 * attempt);
        }
    }
    gs.error('agentbridge: incident ' + body.number + ' not delivered after ' + attempts + ' attempts');
})(current, previous);
