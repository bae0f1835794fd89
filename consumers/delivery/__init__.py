"""The delivery worker: takes alerts from the precedence-list queues and delivers them.

``worker`` consumes and acknowledges, ``subscriptions`` keeps the set of consumed lists in
step with the configuration, ``hostlists`` learns which ad-hoc lists exist,
``resolve`` turns a destination or group into a delivery plan, ``executor`` runs a plan with
retries, and ``channels`` speaks to the outside world (files, webhooks, mail, Apprise).
"""
