#!/usr/bin/perl
# Verifies the ARC chain of a message with Perl's Mail::DKIM::ARC::Verifier (Debian
# libmail-dkim-perl): an implementation independent of the dkimpy that seals.
# Usage: perl arc_verify.pl DNS_PORT < message
# The keys are looked up on the tests' DNS server at 127.0.0.1:DNS_PORT (Net::DNS), never
# the machine's resolver.  Prints one line per ARC-Seal and ARC-Message-Signature,
#   type instance domain selector result (detail)
# then "overall: <result> (<detail>)", and exits 0.  Exit 2: the modules are missing.
use strict;
use warnings;

my $port = shift @ARGV or die "usage: arc_verify.pl DNS_PORT < message\n";
for my $module (qw(Mail::DKIM::ARC::Verifier Mail::DKIM::DNS Net::DNS::Resolver)) {
    eval "require $module; 1" or do { print "missing: $module\n"; exit 2 };
}
my $resolver = Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 1,
    udp_timeout => 5, tcp_timeout => 5, retry => 1, searchlist => [], defnames => 0,
);
Mail::DKIM::DNS::resolver($resolver);

my $arc = Mail::DKIM::ARC::Verifier->new(Strict => 1);
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z//;
    $arc->PRINT("$line\015\012");
}
$arc->CLOSE;
for my $signature ($arc->signatures) {
    my $type = ref($signature) =~ /Seal/ ? 'seal' : 'ams';
    printf "%s %s %s %s %s (%s)\n", $type, $signature->instance, $signature->domain,
        $signature->selector, $signature->result // '', $signature->result_detail // '';
}
printf "overall: %s (%s)\n", $arc->result, $arc->result_detail // '';
exit 0;
